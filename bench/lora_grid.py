"""LoRA work of a 5x5 weight grid: ours in the grid's best order and in row-by-row order, and diffusers.

    python -m bench.lora_grid --out bench/results/lora_grid_cpu.json     # SDXL-shaped, bf16, CPU
    python -m bench.lora_grid --tiny                                    # embedded tiny model, seconds

LoRA work only, as bench/lora_switch.py measures it (no denoising): each cell of a grid over two
kohya LoRAs (rank 32) at weights 0, 0.25, 0.5, 0.75, 1 is brought in with the patcher, in the
order `studio.grid` would pick (`grid_order.best_order`) and in row-by-row order; diffusers goes
row by row with unfuse + set_adapters + fuse per cell, both adapters loaded once. Two scenarios:
- `full`: both LoRAs on all 986 SDXL modules. Any weight change rewrites every layer (an exact
  merge must), so no order can save work: what this shows is the per-cell cost against diffusers.
- `partial`: the second LoRA only on the UNet's output blocks (a block-trained LoRA), where the
  order matters: changing only that LoRA rewrites only its layers.
Sides run one after another in one process (ours best, ours row by row, diffusers, then ours
both again), so the table gives medians of ours over two passes beside diffusers' one; in the
first pass of each side every cell's sampled weights are checked against an independent float64
sum (bench/_exactness.py). On a shared machine use `--threads 1`: spinning OpenMP threads
against other processes slow GEMMs by orders of magnitude (tests/conftest.py `one_thread`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench._exactness import Checker, as_dict
from bench._report import machine, quiet_libraries
from bench._timing import on_threads, rss_gb, sync
from bench.lora_switch import DTYPES

log = logging.getLogger(__name__)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Config:
    scenario: str = "partial"  # "full" or "partial"
    device: str = "cpu"
    dtype: str = "bf16"
    tiny: bool = False
    sample: int = 20
    checks: bool = True
    diffusers: bool = True
    lora_dir: Path | None = None
    threads: int | None = None


class _Subset:
    """A ModelIndex seen through a filter: what `ensure_loras` writes a partial LoRA from."""

    def __init__(self, index: Any, keep) -> None:
        self._index, self._keep = index, keep

    def kohya_targets(self, conv: bool = False, text_encoders: bool = True) -> list:
        return [i for i in self._index.kohya_targets(conv, text_encoders) if self._keep(i)]

    def kohya_key(self, info: Any, sgm: bool = True) -> str:
        return self._index.kohya_key(info, sgm)


def _stack_items(paths: list[Path], weights: tuple[float, float]):
    from studio.lora.spec import LoraSpec
    from studio.lora.stack import StackItem

    return [StackItem(p.stem, p, LoraSpec(p.stem, w)) for p, w in zip(paths, weights)]


def _cells() -> list[tuple[int, int, int]]:
    from studio.grid_order import row_major

    return row_major((len(WEIGHTS), len(WEIGHTS), 1))


def _weights(cell: tuple[int, ...]) -> tuple[float, float]:
    return WEIGHTS[cell[0]], WEIGHTS[cell[1]]


def run_ours(patcher: Any, loras: list[Any], paths: list[Path], order: list, checker: Checker | None,
             device: torch.device) -> list[dict[str, Any]]:
    patcher.clear()
    rows = []
    for cell in order:
        stack = [(lora, w) for lora, w in zip(loras, _weights(cell))]
        sync(device)
        t0 = time.perf_counter()
        stats = patcher.apply(stack)
        sync(device)
        row = {"cell": list(cell), "seconds": time.perf_counter() - t0, "touched": stats.tensors_touched,
               "bytes_written": stats.bytes_written}
        if checker is not None:
            row["exact"] = as_dict(checker.stack([(p, w) for p, w in zip(paths, _weights(cell))]))
        rows.append(row)
    return rows


def run_diffusers(pipe: Any, paths: list[Path], order: list, checker: Checker | None,
                  device: torch.device) -> tuple[list[dict[str, Any]], list[float]]:
    names = ["a", "b"]
    loads = []
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, name in zip(paths, names):
            t0 = time.perf_counter()
            pipe.load_lora_weights(str(path), adapter_name=name)
            loads.append(time.perf_counter() - t0)
        fused = False
        for cell in order:
            live = [(n, w) for n, w in zip(names, _weights(cell)) if w != 0.0]
            sync(device)
            t0 = time.perf_counter()
            if fused:
                pipe.unfuse_lora()
            if live:
                pipe.set_adapters([n for n, _ in live], [w for _, w in live])
                pipe.fuse_lora()
            sync(device)
            fused = bool(live)
            row = {"cell": list(cell), "seconds": time.perf_counter() - t0}
            if checker is not None:
                row["exact"] = as_dict(checker.stack([(p, w) for p, w in zip(paths, _weights(cell))]))
            rows.append(row)
        if fused:
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
    if checker is not None:
        checker.pristine(restore=True)  # unfuse subtracted: put pristine back for whatever runs next
    return rows, loads


def run(config: Config) -> dict[str, Any]:
    return on_threads(config.threads, _run, config)


def _run(config: Config) -> dict[str, Any]:
    from bench._kohya_files import LoraSpec, ensure_loras
    from bench._sdxl_random import build_sdxl, load_tiny
    from studio.choices import LoraMode
    from studio.grid_order import CostModel, best_order, row_major
    from studio.lora.block_weights import block_of
    from studio.lora.cache import LoraCache
    from studio.lora.keymap import ModelIndex
    from studio.lora.patcher import LoraPatcher, PatcherSettings
    from studio.lora.reader import read_lora
    from studio.paths import app_dirs

    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    result: dict[str, Any] = {"config": {**asdict(config), "lora_dir": str(config.lora_dir)}, "machine": machine(),
                              "weights": list(WEIGHTS)}
    model = (load_tiny if config.tiny else build_sdxl)(dtype, device)
    index = ModelIndex.from_modules(model.components)
    result["model"] = {"label": model.label, "targets": len(index.kohya_targets()), "rss_gb": rss_gb()[0]}
    folder = config.lora_dir or app_dirs().cache / "bench-loras"
    rank, alpha = (8, 4.0) if config.tiny else (32, 16.0)
    lora_dtype = config.dtype if config.dtype in ("bf16", "fp16") else "fp16"
    kind = "tiny" if config.tiny else "sdxl"
    first, _ = ensure_loras(folder, index, [LoraSpec(kind, rank, alpha, lora_dtype, 1)], model.weight_std)
    if config.scenario == "partial":
        second, _ = ensure_loras(folder, _Subset(index, lambda i: i.component == "unet" and i.path.startswith(
            "up_blocks")), [LoraSpec(kind, rank, alpha, lora_dtype, 7)], model.weight_std)
    else:
        second, _ = ensure_loras(folder, index, [LoraSpec(kind, rank, alpha, lora_dtype, 2)], model.weight_std)
    paths = first + second
    cache = LoraCache(1 << 40, lambda p: read_lora(p, index))
    pins = [cache.pin(p) for p in paths]
    loras = [pin.lora for pin in pins]
    result["loras"] = [{"file": p.name, "layers": len(lo.patches)} for p, lo in zip(paths, loras)]
    by_path = dict(zip(paths, loras))

    def footprint(item):
        size = torch.finfo(dtype).bits // 8
        return [(p.component, p.module, block_of(p.component, index.sgm_path(p.module)),
                 model.components[p.component].get_submodule(p.module).weight.numel() * size)
                for p in by_path[item.path].patches]

    shape = (len(WEIGHTS), len(WEIGHTS), 1)
    stacks = {cell: _stack_items(paths, _weights(cell)) for cell in _cells()}
    t0 = time.perf_counter()
    cost = CostModel(stacks, footprint)
    best, method = best_order(shape, cost)
    naive = row_major(shape)
    result["planning_seconds"] = time.perf_counter() - t0
    result["order"] = {"best": method, "best_bytes": cost.total(best), "row_by_row_bytes": cost.total(naive)}
    checker = Checker(model, index, paths, config.sample) if config.checks else None
    patcher = LoraPatcher(model.components, PatcherSettings(mode=LoraMode.MERGED),
                          pristine_source=model.pristine_source)
    passes: dict[str, list[list[dict[str, Any]]]] = {"best": [], "row_by_row": []}
    try:
        patcher.apply([(loras[0], 1.0), (loras[1], 1.0)])  # first use: per-file checks, first calls
        for side, order in (("best", best), ("row_by_row", naive)):
            passes[side].append(run_ours(patcher, loras, paths, order, checker, device))
            log.info("%s: %.1f s", side, sum(r["seconds"] for r in passes[side][-1]))
        patcher.clear()
        if config.diffusers:
            result["diffusers"], result["diffusers_load"] = run_diffusers(model.pipe, paths, naive, checker, device)
            log.info("diffusers: %.1f s", sum(r["seconds"] for r in result["diffusers"]))
        for side, order in (("best", best), ("row_by_row", naive)):  # checked once already: timings only
            passes[side].append(run_ours(patcher, loras, paths, order, None, device))
            log.info("%s again: %.1f s", side, sum(r["seconds"] for r in passes[side][-1]))
        patcher.clear()
        if checker is not None:
            result["after_clear"] = as_dict(checker.pristine())
    finally:
        patcher.close()
        for pin in pins:
            pin.release()
    result["ours"] = passes
    result["summary"] = summarize(result)
    result["peak_rss_gb"] = rss_gb()[1]
    return result


def _worst(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r["exact"] for r in rows if r.get("exact")]
    return max(found, key=lambda e: (e["tensors"] - e["tensors_equal"], e["max_ulp"])) if found else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, runs in result["ours"].items():
        totals = [sum(r["seconds"] for r in rows) for rows in runs]
        out[side] = {"total_seconds": statistics.median(totals), "totals": totals,
                     "cell_median": statistics.median(r["seconds"] for rows in runs for r in rows),
                     "tensors": sum(r["touched"] for r in runs[0]), "bytes": sum(r["bytes_written"] for r in runs[0]),
                     "exact_worst": _worst([r for rows in runs for r in rows])}
    if "diffusers" in result:
        rows = result["diffusers"]
        out["diffusers"] = {"total_seconds": sum(r["seconds"] for r in rows),
                            "cell_median": statistics.median(r["seconds"] for r in rows),
                            "load_seconds": sum(result["diffusers_load"]), "exact_worst": _worst(rows)}
    best, naive = out["best"], out["row_by_row"]
    out["best_vs_row_by_row"] = naive["total_seconds"] / best["total_seconds"] if best["total_seconds"] else None
    # the estimate the app shows (grid.json): best's measured seconds per byte x row-by-row's bytes
    out["row_by_row_estimate"] = best["total_seconds"] * naive["bytes"] / best["bytes"] if best["bytes"] else None
    if "diffusers" in out:
        out["diffusers_vs_best"] = out["diffusers"]["total_seconds"] / best["total_seconds"]
        out["diffusers_vs_row_by_row"] = out["diffusers"]["total_seconds"] / naive["total_seconds"]
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]

    def sec(v: float | None) -> str:
        return "—" if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s")

    def exact(e: dict[str, Any] | None) -> str:
        return e["text"] if e else "—"

    lines = [f"scenario {result['config']['scenario']}: {result['loras'][0]['layers']} + "
             f"{result['loras'][1]['layers']} layers; best order: {result['order']['best']}",
             "| side | grid total | per cell (median) | tensors rewritten | GB rewritten | exactness (worst cell) |",
             "|---|---:|---:|---:|---:|---|"]
    for side, label in (("best", "ours, best order"), ("row_by_row", "ours, row by row")):
        e = s[side]
        lines.append(f"| {label} | {sec(e['total_seconds'])} | {sec(e['cell_median'])} | {e['tensors']} | "
                     f"{e['bytes'] / 1e9:.1f} | {exact(e['exact_worst'])} |")
    if "diffusers" in s:
        e = s["diffusers"]
        lines.append(f"| diffusers (unfuse + set_adapters + fuse) | {sec(e['total_seconds'])} | "
                     f"{sec(e['cell_median'])} | | | {exact(e['exact_worst'])} |")
    lines.append("")
    lines.append(f"row by row / best: {s['best_vs_row_by_row']:.2f}x (the app's estimate for row by row: "
                 f"{sec(s['row_by_row_estimate'])}, measured {sec(s['row_by_row']['total_seconds'])})")
    if "diffusers" in s:
        lines.append(f"diffusers / ours best: {s['diffusers_vs_best']:.1f}x; diffusers / ours row by row: "
                     f"{s['diffusers_vs_row_by_row']:.1f}x; diffusers load_lora_weights: "
                     f"{sec(s['diffusers']['load_seconds'])} for both files (not in its total)")
    lines.append(f"ours' two passes: best {', '.join(sec(t) for t in s['best']['totals'])}; row by row "
                 f"{', '.join(sec(t) for t in s['row_by_row']['totals'])}; planning {sec(result['planning_seconds'])}")
    if "after_clear" in result:
        lines.append(f"after the last clear: {result['after_clear']['text']}; peak RSS {result['peak_rss_gb']:.1f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("full", "partial", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CPU, fp16 on CUDA")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny model (seconds)")
    parser.add_argument("--sample", type=int, default=20, help="weights checked after every cell")
    parser.add_argument("--no-checks", action="store_true", help="timings only")
    parser.add_argument("--no-diffusers", action="store_true", help="ours only")
    parser.add_argument("--lora-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "bf16")
    results = {}
    for scenario in (("full", "partial") if args.scenario == "both" else (args.scenario,)):
        results[scenario] = run(Config(scenario, args.device, dtype, args.tiny, args.sample, not args.no_checks,
                                       not args.no_diffusers, args.lora_dir, args.threads))
        print(markdown(results[scenario]), flush=True)
        print()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
