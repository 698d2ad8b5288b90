"""LoRA switching benchmark: our cached, merged patcher against diffusers' fuse/unfuse, same run.

    python -m bench.lora_switch --out bench-lora-switch.json          # SDXL-shaped, bf16, CPU
    python -m bench.lora_switch --device cuda --dtype fp16            # the same on a GPU
    python -m bench.lora_switch --tiny                                # embedded tiny model, seconds

Scenario (4 kohya LoRAs, rank 32, all 986 SDXL modules): apply A (1+2 at 0.8/0.6), switch
to B (3+4), move one weight (LoRA 3 to 0.5), apply A again, the same A again, clear; then,
as a yardstick for "move one weight", apply LoRA 3 alone and clear. Ours runs from the
app's warm state (files parsed and pinned in the LoraCache, pristine copies taken), once
with `unpatch_lora_by_vram_offload` off and once on; diffusers keeps all four adapters
loaded and switches with unfuse + set_adapters + fuse (its fastest exact-API path), its
per-file load cost reported apart. Rounds interleave ours and diffusers so background
load hits both alike; the table shows medians, round 0 (first use) is kept apart.
Every step is checked for exactness against an independent float64 computation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench._exactness import Checker, as_dict

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (step name, stack as (LoRA index, weight) pairs); the three reference steps run for ours only
STACK_A = ((0, 0.8), (1, 0.6))
STACK_B = ((2, 0.9), (3, 0.7))
STACK_B2 = ((2, 0.5), (3, 0.7))
SCENARIO: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = (
    ("apply A (1+2)", STACK_A),
    ("switch A -> B (3+4)", STACK_B),
    ("move one weight (LoRA 3 0.9 -> 0.5)", STACK_B2),
    ("apply A again", STACK_A),
    ("same stack again (A -> A)", STACK_A),
    ("clear", ()),
)
# "Re-applying that one LoRA": take LoRA 3 out of B' and put it back (its layers recomputed with LoRA 4
# present, as any exact merge must); applying it alone on a clean model is shown too.
REFERENCE: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = (
    ("ref: apply LoRA 3 alone", ((2, 0.5),)),
    ("ref: clear LoRA 3", ()),
    ("ref: apply LoRA 4 alone", ((3, 0.7),)),
    ("ref: re-add LoRA 3 (-> B')", STACK_B2),
    ("ref: clear B'", ()),
)
MOVE, READD, ALONE, SAME = ("move one weight (LoRA 3 0.9 -> 0.5)", "ref: re-add LoRA 3 (-> B')",
                            "ref: apply LoRA 3 alone", "same stack again (A -> A)")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GB (peak from VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e9
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


# -- ours -------------------------------------------------------------------------------------------
def run_ours(patcher: Any, loras: list[Any], paths: list[Path], checker: Checker, checks: bool, offload: bool,
             device: torch.device) -> dict[str, dict[str, Any]]:
    """One pass of the scenario (plus the reference steps) through LoraPatcher in merged mode."""
    from dataclasses import replace

    patcher.configure(replace(patcher.settings, unpatch_lora_by_vram_offload=offload))
    out: dict[str, dict[str, Any]] = {}
    for name, stack in SCENARIO + REFERENCE:
        def step(stack: tuple[tuple[int, float], ...] = stack) -> Any:
            stats = patcher.apply([(loras[i], w) for i, w in stack])
            if offload and stats.tensors_restored:
                patcher.materialize()  # as the session does: a dropped weight is reloaded before use
            return stats

        seconds, stats = _timed(step, device)
        row: dict[str, Any] = {"seconds": seconds, "touched": stats.tensors_touched, "skipped": stats.tensors_skipped,
                               "snapshotted": stats.tensors_snapshotted}
        if checks:
            row["exact"] = as_dict(checker.stack([(paths[i], w) for i, w in stack]))
            if not stack:
                row["pristine"] = as_dict(checker.pristine())
        out[name] = row
    return out


# -- diffusers --------------------------------------------------------------------------------------
def run_diffusers(pipe: Any, paths: list[Path], checker: Checker, checks: bool,
                  device: torch.device) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """The scenario through load_lora_weights / set_adapters / fuse_lora / unfuse_lora / unload."""
    names = [f"l{i + 1}" for i in range(len(paths))]
    loads: list[float] = []
    out: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns per layer when asked to merge what is merged
        for path, name in zip(paths, names):
            loads.append(_timed(lambda p=path, n=name: pipe.load_lora_weights(str(p), adapter_name=n), device)[0])
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

            seconds, _ = _timed(step, device)
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
def _median(rows: list[dict[str, dict[str, Any]]], step: str) -> float | None:
    values = [r[step]["seconds"] for r in rows if step in r]
    return statistics.median(values) if values else None


def _worst(rows: list[dict[str, dict[str, Any]]], step: str, key: str) -> dict[str, Any] | None:
    """The worst exactness result of a step over rounds (most tensors off)."""
    found = [r[step][key] for r in rows if step in r and r[step].get(key)]
    if not found:
        return None
    return max(found, key=lambda e: (e.get("differing", 0), e["tensors"] - e.get("tensors_equal", e["tensors"]),
                                     e.get("max_ulp", 0), e.get("max_abs", 0.0)))


def run(config: Config) -> dict[str, Any]:
    """Build the model and LoRAs, run the rounds, return everything measured (also written as JSON)."""
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config) -> dict[str, Any]:
    from bench._kohya_files import LoraSpec, ensure_loras
    from bench._sdxl_random import build_sdxl, load_tiny
    from studio.lora.cache import LoraCache
    from studio.lora.keymap import ModelIndex
    from studio.choices import LoraMode
    from studio.lora.patcher import LoraPatcher, PatcherSettings
    from studio.lora.reader import read_lora
    from studio.paths import app_dirs

    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("fp16 matmul on CPU runs at ~1 GFLOPS (DESIGN.md 4); use bf16 or fp32 there")
    result: dict[str, Any] = {"config": {**asdict(config), "lora_dir": str(config.lora_dir)}, "machine": _machine()}
    model = (load_tiny if config.tiny else build_sdxl)(dtype, device)
    index = ModelIndex.from_modules(model.components)
    result["model"] = {"label": model.label, "build_seconds": model.build_seconds, "rss_gb": rss_gb()[0],
                       "targets": len(index.kohya_targets())}
    log.info("built %s in %.1f s", model.label, model.build_seconds)

    folder = config.lora_dir or app_dirs().cache / "bench-loras"
    rank, alpha = (8, 4.0) if config.tiny else (32, 16.0)
    # peft casts adapters to the weight dtype, so files in that dtype keep diffusers' factors exact
    lora_dtype = config.lora_dtype or (config.dtype if config.dtype in ("bf16", "fp16") else "fp16")
    specs = [LoraSpec("tiny" if config.tiny else "sdxl", rank, alpha, lora_dtype, seed) for seed in (1, 2, 3, 4)]
    paths, spent = ensure_loras(folder, index, specs, model.weight_std)
    result["loras"] = {"files": [str(p) for p in paths], "mb_each": paths[0].stat().st_size / 1e6,
                       "write_seconds": spent, "rank": rank, "alpha": alpha}
    checker = Checker(model, index, paths, config.sample)
    checks = not config.steps_only

    cache = LoraCache(1 << 40, lambda p: read_lora(p, index))
    pins, parse = [], []
    for p in paths:
        seconds, pin = _timed(lambda p=p: cache.pin(p), device)
        pins.append(pin)
        parse.append(seconds)
    loras = [pin.lora for pin in pins]
    result["ours_first_parse_seconds"] = parse
    if model.pristine_source is not None:
        result["snapshot_seconds"] = measure_snapshot(checker, device)  # what the patcher pays without one
    fingerprint = model.integrity() if model.integrity else None
    patcher = LoraPatcher(model.components, PatcherSettings(mode=LoraMode.MERGED),
                          pristine_source=model.pristine_source)
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(config.rounds + 1):  # round 0: first use (snapshots, per-file checks, first calls)
            row: dict[str, Any] = {}
            for label, offload in (("ours_off", False), ("ours_on", True)):
                row[label] = run_ours(patcher, loras, paths, checker, checks, offload, device)
                log.info("round %d %s: %s", r, label, {k: round(v["seconds"], 3) for k, v in row[label].items()})
            gc.collect()
            row["diffusers"], row["diffusers_load"] = run_diffusers(model.pipe, paths, checker, checks, device)
            log.info("round %d diffusers: %s", r, {k: round(v["seconds"], 3) for k, v in row["diffusers"].items()})
            row["rss_gb"], row["peak_rss_gb"] = rss_gb()
            rounds.append(row)
            gc.collect()
    finally:
        patcher.close()
        for pin in pins:
            pin.release()
    result["after_close"] = asdict(checker.pristine())
    result["pristine_source_unchanged"] = None if fingerprint is None else model.integrity() == fingerprint
    result["rounds"] = rounds
    result["summary"] = summarize(rounds)
    result["peak_rss_gb"] = rss_gb()[1]
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def measure_snapshot(checker: Checker, device: torch.device) -> float:
    """Seconds to copy every targeted weight into fresh RAM, one at a time (the patcher's first-touch
    snapshot when no model-cache copy is given), without holding the 5.9 GB at once."""
    total = 0.0
    for info in checker.targets:
        live = checker.live(info)
        seconds, copy = _timed(lambda live=live: live.to("cpu", copy=True), device)
        total += seconds
        del copy
    return total


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured rounds (round 0 apart), ratios, and the issue's targets."""
    measured = rounds[1:] or rounds
    steps: dict[str, dict[str, Any]] = {}
    for name, _ in SCENARIO + REFERENCE:
        entry: dict[str, Any] = {}
        for side in ("ours_off", "ours_on", "diffusers"):
            rows = [r[side] for r in measured]
            entry[side] = _median(rows, name)
            entry[f"{side}_first"] = rounds[0][side].get(name, {}).get("seconds")
            entry[f"{side}_exact"] = _worst([r[side] for r in rounds], name, "exact")
            entry[f"{side}_pristine"] = _worst([r[side] for r in rounds], name, "pristine")
        for side in ("ours_off", "ours_on"):
            if entry["diffusers"] and entry[side]:
                entry[f"ratio_{side}"] = entry["diffusers"] / entry[side]
        steps[name] = entry
    loads = [s for r in measured for s in r["diffusers_load"]]
    targets: dict[str, Any] = {}
    for side in ("ours_off", "ours_on"):
        ratios = [steps[s].get(f"ratio_{side}", 0.0) for s in ("apply A (1+2)", "switch A -> B (3+4)")]
        clears = [steps[s][f"{side}_pristine"] for s, stack in SCENARIO + REFERENCE if not stack]
        move, readd, alone, same = (steps[s][side] for s in (MOVE, READD, ALONE, SAME))
        targets[side] = {
            "apply_and_switch_5x": {"ratios": ratios, "met": min(ratios) >= 5.0},
            "bit_exact_restore": {"checked": all(c is not None for c in clears),
                                  "met": all(c is not None and c["differing"] == 0 for c in clears)},
            "same_stack_under_10ms": {"seconds": same, "met": same < 0.010},
            "move_le_reapply_one": {"move": move, "re_add": readd, "apply_alone": alone, "met": move <= readd},
        }
    return {"steps": steps, "diffusers_load_median": statistics.median(loads) if loads else None,
            "diffusers_load_first": rounds[0]["diffusers_load"], "targets": targets}


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch picked
                            "date": dt.datetime.now().isoformat(timespec="seconds")}
    try:
        import diffusers
        import peft

        info |= {"diffusers": diffusers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(result: dict[str, Any]) -> str:
    """The results table: medians in seconds, ratios, and the worst exactness over all rounds."""
    def sec(v: float | None) -> str:
        return "—" if v is None else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")

    def ratio(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}x"

    def exact(entry: dict[str, Any], side: str) -> str:
        e = entry.get(f"{side}_pristine") or entry.get(f"{side}_exact")
        return e["text"] if e else "—"

    lines = ["| step | ours off | ours on | diffusers | diffusers/ours off | diffusers/ours on "
             "| exactness ours (off; on) | exactness diffusers |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in result["summary"]["steps"].items():
        lines.append(f"| {name} | {sec(entry['ours_off'])} | {sec(entry['ours_on'])} | {sec(entry['diffusers'])} "
                     f"| {ratio(entry.get('ratio_ours_off'))} | {ratio(entry.get('ratio_ours_on'))} "
                     f"| {exact(entry, 'ours_off')}; {exact(entry, 'ours_on')} | {exact(entry, 'diffusers')} |")
    s = result["summary"]
    lines.append("")
    lines.append(f"diffusers load_lora_weights per file: median {sec(s['diffusers_load_median'])}; "
                 f"ours first parse per file: {', '.join(sec(v) for v in result['ours_first_parse_seconds'])}")
    if s["diffusers_load_median"]:
        loads = 2 * s["diffusers_load_median"]
        derived = ", ".join(f"{name} {(e['diffusers'] + loads) / e['ours_off']:.1f}x" for name, e in s["steps"].items()
                            if name in ("apply A (1+2)", "switch A -> B (3+4)") and e["ours_off"] and e["diffusers"])
        lines.append(f"diffusers loading the two files on each switch instead (derived: + 2 loads): {derived} "
                     "(vs ours off)")
    first = s["steps"]["apply A (1+2)"]
    lines.append(f"first use (round 0) apply A: ours {sec(first['ours_off_first'])} (pristine snapshot + file checks), "
                 f"diffusers {sec(first['diffusers_first'])}")
    for side, targets in s["targets"].items():
        verdicts = ", ".join(f"{k} {'NOT CHECKED' if v.get('checked') is False else 'MET' if v['met'] else 'MISSED'}"
                             for k, v in targets.items())
        lines.append(f"targets {side}: {verdicts}")
    if "snapshot_seconds" in result:
        lines.append(f"pristine copies come from the model's RAM copy (pristine_source); snapshotting them instead "
                     f"(first touch, no model cache) costs {sec(result['snapshot_seconds'])} once")
    lines.append(f"peak RSS {result['peak_rss_gb']:.1f} GB; after close: {result['after_close']['differing']} "
                 f"of {result['after_close']['tensors']} targeted weights differ from pristine; pristine source "
                 f"unchanged: {result['pristine_source_unchanged']}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """No progress bars or per-load key reports from diffusers/transformers in the benchmark output."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CPU, fp16 on CUDA")
    parser.add_argument("--tiny", action="store_true", help="the same flow on the embedded tiny model (seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds after round 0 (default 3; 1 with "
                                                                 "--steps-only)")
    parser.add_argument("--steps-only", action="store_true", help="timings only: skip the exactness checks")
    parser.add_argument("--sample", type=int, default=50, help="weights compared after each step")
    parser.add_argument("--lora-dir", type=Path, default=None, help="where the generated LoRAs are cached")
    parser.add_argument("--lora-dtype", choices=("fp16", "bf16"), default=None, help="default: the model dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "bf16")
    rounds = args.rounds if args.rounds is not None else (1 if args.steps_only else 3)
    result = run(Config(args.device, dtype, args.tiny, rounds, args.steps_only, args.sample, args.lora_dir,
                        args.lora_dtype, args.threads))
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
