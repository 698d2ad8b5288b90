"""A1111-compatible PNG `parameters` text: write it, and read it back into a request.

Layout (A1111 `create_infotext`): the prompt, then `Negative prompt: ...`, then one
line of comma-separated `Key: value` pairs, values quoted when they hold a comma,
colon or quote. LoRAs appear as `<lora:name:weight>` in the prompt and in
`Lora hashes: "name: 0123456789ab, ..."` (A1111's Lora extension format). A LoRA with
more than a weight keeps all of it in its tag (`<lora:name:1:0.5:lbw=INS:stop=10>`, the
syntax of studio.lora.spec), so PNG info gives back the same request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

from studio.errors import SettingsError
from studio.lora.spec import spec_of, split_tags
from studio.request import GenerationRequest

PNG_KEY = "parameters"
_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative: str
    params: dict[str, str] = field(default_factory=dict)

    def to_request(self) -> GenerationRequest:
        """The request that reproduces the image (LoRA tags moved from the prompt to `loras`)."""
        prompt, loras = split_lora_tags(self.prompt)
        data: dict = {"prompt": prompt, "negative": self.negative, "loras": loras}
        for key, name in (("Steps", "steps"), ("CFG scale", "cfg"), ("Seed", "seed"), ("Sampler", "sampler")):
            if key in self.params:
                data[name] = self.params[key]
        size = self.params.get("Size", "")
        if re.fullmatch(r"\d+x\d+", size):
            data["width"], data["height"] = (int(v) for v in size.split("x"))
        return GenerationRequest.from_dict(data)


def _quote(value: str) -> str:
    if any(ch in value for ch in ',:"\n'):
        return json.dumps(value)
    return value


def format_infotext(request: GenerationRequest, *, width: int, height: int, model_name: str, model_hash: str,
                    lora_hashes: dict[str, str] | None = None, version: str = "", vae: str = "") -> str:
    """The `parameters` text for one image; `request.seed` must be the concrete seed used."""
    prompt = request.prompt + "".join(f" {spec_of(entry).tag()}" for entry in request.loras)
    params = {
        "Steps": str(request.steps),
        "Sampler": request.sampler,
        "CFG scale": f"{request.cfg:g}",
        "Seed": str(request.seed),
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE": vae,  # A1111's key for a separate VAE; left out when the model's own decoded
    }
    if lora_hashes:
        params["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in lora_hashes.items())
    if version:
        params["Version"] = version
    tail = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v != "")
    lines = [prompt.strip()]
    if request.negative:
        lines.append(f"Negative prompt: {request.negative}")
    lines.append(tail)
    return "\n".join(lines)


def parse_infotext(text: str) -> Infotext:
    """Inverse of format_infotext; also reads A1111/Forge files (unknown keys kept as text)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    params: dict[str, str] = {}
    if len(_PAIR.findall(last)) >= 3:
        for key, value in _PAIR.findall(last):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                value = json.loads(value)
            params[key.strip()] = value
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    return Infotext(prompt="\n".join(prompt_lines).strip(), negative="\n".join(negative_lines).strip(),
                    params=params)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple]]:
    """Remove `<lora:...>` tags from the prompt and return them in order, as request entries
    ((name, weight) or (name, weight, options)). A tag that does not parse raises SettingsError."""
    text, specs = split_tags(prompt)
    return text, [spec.entry() for spec in specs]


def save_png(image: Image.Image, path: Path | BinaryIO, infotext: str) -> None:
    """Write the PNG with its `parameters` chunk (deterministic bytes for the same pixels/text), to a
    path or into an open file (the outputs folder creates its files exclusively)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, infotext)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)


def read_png_infotext(path: Path) -> Infotext:
    try:
        with Image.open(path) as img:
            text = img.info.get(PNG_KEY) or img.text.get(PNG_KEY) if hasattr(img, "text") else None
    except OSError as err:
        raise SettingsError(f"{path.name}: not a readable image ({err})") from None
    if not text:
        raise SettingsError(f"{path.name}: has no generation parameters (no PNG `{PNG_KEY}` text)")
    return parse_infotext(text)
