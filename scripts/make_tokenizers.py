"""Derive SDXL's two CLIP tokenizers from the public CLIP BPE vocabulary.

The vocabulary ships inside the open-clip-torch wheel on PyPI
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). We rebuild the exact token table of
OpenAI's CLIP tokenizer from it (256 byte symbols, the same with `</w>`, 48,894
merges, then the two special tokens: 49,408 ids) and write the files
`transformers.CLIPTokenizer.from_pretrained` reads. The result is committed as
data under `assets/`; open-clip is never a runtime dependency.

Usage: python scripts/make_tokenizers.py [--wheel PATH] [--out assets/sdxl-base]
Without --wheel the wheel is fetched with `pip download` (needs PyPI).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
REPO = Path(__file__).resolve().parent.parent


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_merges(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read(VOCAB_MEMBER)).decode("utf-8")
    lines = text.split("\n")
    return lines[1 : N_MERGES + 1]


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def tokenizer_config(pad_token: str) -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = tokenizer_config(pad_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def fetch_wheel(into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), "open-clip-torch==3.3.0"],
        check=True,
    )
    return next(into.glob("open_clip_torch-*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a local open-clip-torch wheel")
    parser.add_argument("--out", type=Path, nargs="+", default=[REPO / "assets" / "sdxl-base"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        merges = read_merges(wheel)
    vocab = build_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    for out in args.out:
        # SDXL: TE1 (CLIP-L) pads with <|endoftext|>, TE2 (OpenCLIP bigG) pads with "!" (id 0).
        write_tokenizer(out / "tokenizer", vocab, merges, "<|endoftext|>")
        write_tokenizer(out / "tokenizer_2", vocab, merges, "!")
        print(f"wrote {out}/tokenizer and {out}/tokenizer_2 ({len(vocab)} tokens)")


if __name__ == "__main__":
    main()
