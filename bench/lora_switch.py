"""LoRA switching benchmark: our cached merged patcher, InvokeAI's LayerPatcher and diffusers, same run.

    python -m bench.lora_switch --out bench-lora-switch.json          # SDXL-shaped, bf16, CPU
    python -m bench.lora_switch --reduced --dtype fp32                # reduced SDXL-shaped model, fp32
    python -m bench.lora_switch --invokeai-site /path/to/site         # with InvokeAI as a peer
    python -m bench.lora_switch --device cuda --dtype fp16            # the same on a GPU
    python -m bench.lora_switch --tiny                                # embedded tiny model, seconds

Scenario (4 kohya LoRAs, rank 32, every kohya module of the model): apply A (1+2 at 0.8/0.6),
switch to B (3+4), move one weight (LoRA 3 to 0.5), apply A again, the same A again, clear;
then, as a yardstick for "move one weight", apply LoRA 3 alone and clear (ours only).
- Ours runs from the app's warm state (files parsed and pinned in the LoraCache, pristine copies
  from the model cache's RAM copy), once with `unpatch_lora_by_vram_offload` off and once on.
- diffusers keeps all four adapters loaded and switches with unfuse + set_adapters + fuse (its
  fastest exact-API path); its per-file load cost is reported apart.
- InvokeAI (`--invokeai-site` or $INVOKEAI_SITE; bench/_invokeai_peer.py) keeps the four LoRAs in
  RAM as its model cache does and, like every InvokeAI generation, patches inside its context
  manager and restores on exit: a transition is "exit, enter the new stack".
- Cold first apply, every round: the two files read from disk and applied to a clean model by a
  fresh cache and patcher, with and without the model cache's RAM copy (ours and InvokeAI).
Rounds interleave the peers (their order rotates) so background load hits all alike; the
tables show medians, round 0 (first use) is kept apart. Every step is checked for exactness
against an independent float64 computation.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench._exactness import Checker, as_dict
from bench._invokeai_peer import cold_invokeai, run_invokeai, setup_invokeai
from bench._report import REFERENCE, SCENARIO, machine, markdown, quiet_libraries, summarize
from bench._timing import on_threads, rss_gb, sync, timed

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Row = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    dtype: str = "bf16"
    tiny: bool = False
    rounds: int = 3
    steps_only: bool = False  # timings only: no exactness checks
    sample: int = 50
    lora_dir: Path | None = None
    lora_dtype: str | None = None  # None: the model dtype (bf16/fp16), so diffusers' adapters hold the file's values
    threads: int | None = None  # torch intra-op threads for the run; None leaves torch's default
    reduced: bool = False  # the reduced SDXL-shaped model (bench/_sdxl_random.py)
    invokeai_site: str | None = None  # where InvokeAI is installed; None: $INVOKEAI_SITE; "": not measured
    diffusers: bool = True
    cold: bool = True  # measure the cold first apply every round


# -- ours -------------------------------------------------------------------------------------------
def run_ours(patcher: Any, loras: list[Any], paths: list[Path], checker: Checker, checks: bool, offload: bool,
             device: torch.device) -> Row:
    """One pass of the scenario (plus the reference steps) through LoraPatcher in merged mode."""
    patcher.configure(replace(patcher.settings, unpatch_lora_by_vram_offload=offload))
    out: Row = {}
    for name, stack in SCENARIO + REFERENCE:
        def step(stack: tuple[tuple[int, float], ...] = stack) -> Any:
            stats = patcher.apply([(loras[i], w) for i, w in stack])
            if offload and stats.tensors_restored:
                patcher.materialize()  # as the session does: a dropped weight is reloaded before use
            return stats

        seconds, stats = timed(step, device)
        row: dict[str, Any] = {"seconds": seconds, "touched": stats.tensors_touched, "skipped": stats.tensors_skipped,
                               "snapshotted": stats.tensors_snapshotted}
        if checks:
            row["exact"] = as_dict(checker.stack([(paths[i], w) for i, w in stack]))
            if not stack:
                row["pristine"] = as_dict(checker.pristine())
        out[name] = row
    return out


def cold_ours(model: Any, index: Any, paths: list[Path], with_source: bool, device: torch.device) -> dict[str, float]:
    """Files read from disk by a fresh LoraCache, applied to the clean model by a fresh patcher."""
    from studio.choices import LoraMode
    from studio.lora.cache import LoraCache
    from studio.lora.patcher import LoraPatcher, PatcherSettings
    from studio.lora.reader import read_lora

    cache = LoraCache(1 << 40, lambda p: read_lora(p, index))
    patcher = LoraPatcher(model.components, PatcherSettings(mode=LoraMode.MERGED),
                          pristine_source=model.pristine_source if with_source else None)
    pins = []
    try:
        t0 = time.perf_counter()
        pins = [cache.pin(p) for p in paths[:2]]
        t1 = time.perf_counter()
        sync(device)
        patcher.apply([(pins[0].lora, 0.8), (pins[1].lora, 0.6)])
        sync(device)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "read": t1 - t0, "apply": t2 - t1}
    finally:
        patcher.close()
        for pin in pins:
            pin.release()


# -- diffusers --------------------------------------------------------------------------------------
def run_diffusers(pipe: Any, paths: list[Path], checker: Checker, checks: bool,
                  device: torch.device) -> tuple[Row, list[float]]:
    """The scenario through load_lora_weights / set_adapters / fuse_lora / unfuse_lora / unload."""
    names = [f"l{i + 1}" for i in range(len(paths))]
    loads: list[float] = []
    out: Row = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns per layer when asked to merge what is merged
        for path, name in zip(paths, names):
            loads.append(timed(lambda p=path, n=name: pipe.load_lora_weights(str(p), adapter_name=n), device)[0])
        fused = False
        for step_name, stack in SCENARIO:
            def step(stack: tuple[tuple[int, float], ...] = stack, fused: bool = fused,
                     same: bool = step_name.startswith("same")) -> None:
                if not stack:
                    pipe.unfuse_lora()
                    pipe.unload_lora_weights()
                    return
                if fused and not same:
                    pipe.unfuse_lora()  # subtracts the fused delta: never bit-exact
                pipe.set_adapters([names[i] for i, _ in stack], [w for _, w in stack])
                pipe.fuse_lora()  # lora_scale=1: strengths live in set_adapters (no scale_layer trap)

            seconds, _ = timed(step, device)
            fused = bool(stack)
            row: dict[str, Any] = {"seconds": seconds}
            if checks:
                row["exact"] = as_dict(checker.stack([(paths[i], w) for i, w in stack]))
            if not stack:
                # unfuse subtracted; record what it left, then put pristine back so that the next
                # round (and ours) starts from the same clean weights
                row["pristine"] = as_dict(checker.pristine(restore=True))
            out[step_name] = row
    return out, loads


# -- the run ----------------------------------------------------------------------------------------
def run(config: Config) -> dict[str, Any]:
    """Build the model and LoRAs, run the rounds, return everything measured (also written as JSON)."""
    return on_threads(config.threads, _run, config)


def _run(config: Config) -> dict[str, Any]:
    from bench._kohya_files import LoraSpec, ensure_loras
    from bench._sdxl_random import build_sdxl, load_tiny
    from studio.choices import LoraMode
    from studio.lora.cache import LoraCache
    from studio.lora.keymap import ModelIndex
    from studio.lora.patcher import LoraPatcher, PatcherSettings
    from studio.lora.reader import read_lora
    from studio.paths import app_dirs

    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("fp16 matmul on CPU runs at ~1 GFLOPS (DESIGN.md 4); use bf16 or fp32 there")
    result: dict[str, Any] = {"config": {**asdict(config), "lora_dir": str(config.lora_dir)}, "machine": machine()}
    model = load_tiny(dtype, device) if config.tiny else build_sdxl(dtype, device, reduced=config.reduced)
    index = ModelIndex.from_modules(model.components)
    result["model"] = {"label": model.label, "build_seconds": model.build_seconds, "rss_gb": rss_gb()[0],
                       "targets": len(index.kohya_targets())}
    log.info("built %s in %.1f s", model.label, model.build_seconds)

    folder = config.lora_dir or app_dirs().cache / "bench-loras"
    rank, alpha = (8, 4.0) if config.tiny else (32, 16.0)
    # peft casts adapters to the weight dtype, so files in that dtype keep diffusers' factors exact
    lora_dtype = config.lora_dtype or (config.dtype if config.dtype in ("bf16", "fp16") else "fp16")
    kind = "tiny" if config.tiny else "reduced" if config.reduced else "sdxl"
    specs = [LoraSpec(kind, rank, alpha, lora_dtype, seed) for seed in (1, 2, 3, 4)]
    paths, spent = ensure_loras(folder, index, specs, model.weight_std)
    result["loras"] = {"files": [str(p) for p in paths], "mb_each": paths[0].stat().st_size / 1e6,
                       "write_seconds": spent, "rank": rank, "alpha": alpha, "dtype": lora_dtype}
    checker = Checker(model, index, paths, config.sample)
    checks = not config.steps_only

    cache = LoraCache(1 << 40, lambda p: read_lora(p, index))
    pins, parse = [], []
    for p in paths:
        seconds, pin = timed(lambda p=p: cache.pin(p), device)
        pins.append(pin)
        parse.append(seconds)
    loras = [pin.lora for pin in pins]
    result["ours_first_parse_seconds"] = parse
    if model.pristine_source is not None:
        result["snapshot_seconds"] = measure_snapshot(checker, device)  # what the patcher pays without one
    peer, inv_loras, result["invokeai"] = setup_invokeai(config.invokeai_site, model, paths, dtype, device)
    log.info("InvokeAI: %s", {k: v for k, v in result["invokeai"].items() if k != "lora_mb_loaded"})
    fingerprint = model.integrity() if model.integrity else None
    patcher = LoraPatcher(model.components, PatcherSettings(mode=LoraMode.MERGED),
                          pristine_source=model.pristine_source)

    def ours(offload: bool) -> Callable[[], Row]:
        return lambda: run_ours(patcher, loras, paths, checker, checks, offload, device)

    def diffusers(row: dict[str, Any]) -> Callable[[], Row]:
        def go() -> Row:
            out, row["diffusers_load"] = run_diffusers(model.pipe, paths, checker, checks, device)
            return out
        return go

    def cold(row: dict[str, Any]) -> Callable[[], Row]:
        def go() -> Row:
            out: Row = {"ours (RAM copy given)": cold_ours(model, index, paths, True, device),
                        "ours (snapshot)": cold_ours(model, index, paths, False, device)}
            if peer is not None:
                out["invokeai (RAM copy given)"] = cold_invokeai(peer, paths, True, device)
                out["invokeai (saves originals)"] = cold_invokeai(peer, paths, False, device)
            if row.get("diffusers_load") and "diffusers" in row:  # derived: its two loads + its apply A
                loads = sum(row["diffusers_load"][:2])
                out["diffusers (2 loads + apply A)"] = {"seconds": loads + row["diffusers"][SCENARIO[0][0]]["seconds"],
                                                        "read": loads, "derived": True}
            return out
        return go

    rounds: list[dict[str, Any]] = []
    try:
        for r in range(config.rounds + 1):  # round 0: first use (snapshots, per-file checks, first calls)
            row: dict[str, Any] = {}
            sides: list[tuple[str, Callable[[], Row]]] = [("ours_off", ours(False)), ("ours_on", ours(True))]
            if config.diffusers:
                sides.append(("diffusers", diffusers(row)))
            if peer is not None:
                sides.append(("invokeai", lambda: run_invokeai(peer, inv_loras, paths, checker, checks, device)))
            turn = r % len(sides)  # rotate who goes first
            for label, fn in sides[turn:] + sides[:turn]:
                row[label] = fn()
                gc.collect()
                log.info("round %d %s: %s", r, label, {k: round(v["seconds"], 3) for k, v in row[label].items()})
            if config.cold:
                row["cold"] = cold(row)()
                gc.collect()
                log.info("round %d cold: %s", r, {k: round(v["seconds"], 3) for k, v in row["cold"].items()})
            row["rss_gb"], row["peak_rss_gb"] = rss_gb()
            rounds.append(row)
    finally:
        patcher.close()
        if peer is not None:
            peer.exit()
        for pin in pins:
            pin.release()
    result["after_close"] = asdict(checker.pristine())
    result["pristine_source_unchanged"] = None if fingerprint is None else model.integrity() == fingerprint
    if peer is not None:  # InvokeAI casts each LoRA to fp32 to patch and leaves it so (LoRALayer.to)
        result["invokeai"]["lora_mb_after"] = [lora.calc_size() / 1e6 for lora in inv_loras]
        # it logs a layer it cannot place and goes on: any warning means it skipped work
        result["invokeai"]["warnings"] = peer.api.warnings.count
        result["invokeai"]["warning_examples"] = peer.api.warnings.examples
    result["rounds"] = rounds
    result["summary"] = summarize(rounds)
    result["peak_rss_gb"] = rss_gb()[1]
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def measure_snapshot(checker: Checker, device: torch.device) -> float:
    """Seconds to copy every targeted weight into fresh RAM, one at a time (the patcher's first-touch
    snapshot when no model-cache copy is given), without holding them all at once."""
    total = 0.0
    for info in checker.targets:
        live = checker.live(info)
        seconds, copy = timed(lambda live=live: live.to("cpu", copy=True), device)
        total += seconds
        del copy
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CPU, fp16 on CUDA")
    parser.add_argument("--tiny", action="store_true", help="the same flow on the embedded tiny model (seconds)")
    parser.add_argument("--reduced", action="store_true", help="reduced SDXL-shaped model (240 modules, SDXL shapes)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds after round 0 (default 3; 1 with "
                                                                 "--steps-only)")
    parser.add_argument("--steps-only", action="store_true", help="timings only: skip the exactness checks")
    parser.add_argument("--sample", type=int, default=50, help="weights compared after each step")
    parser.add_argument("--lora-dir", type=Path, default=None, help="where the generated LoRAs are cached")
    parser.add_argument("--lora-dtype", choices=("fp16", "bf16"), default=None, help="default: the model dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--invokeai-site", default=None,
                        help="folder with InvokeAI installed (pip install --no-deps --target); default $INVOKEAI_SITE")
    parser.add_argument("--no-diffusers", action="store_true", help="leave diffusers out (e.g. to save RAM)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold first-apply measurements")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    if args.tiny and args.reduced:
        parser.error("--tiny and --reduced are two different models; give one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "bf16")
    rounds = args.rounds if args.rounds is not None else (1 if args.steps_only else 3)
    result = run(Config(args.device, dtype, args.tiny, rounds, args.steps_only, args.sample, args.lora_dir,
                        args.lora_dtype, args.threads, args.reduced, args.invokeai_site, not args.no_diffusers,
                        not args.no_cold))
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
