"""Where a cold first apply spends its time: ours and InvokeAI's, by kind of work, against the GEMM floor.

    python -m bench.cold_profile --reduced --dtype fp32 --invokeai-site /path/to/site
    python -m bench.cold_profile --reduced --dtype bf16 --runs 3 --out bench/results/cold_profile_bf16.json

A cold first apply is: two LoRA files read from disk (parse, checks, hash) by a fresh cache,
then applied to a clean model by a fresh patcher (ours), or loaded as InvokeAI's LoRALoader
does and patched inside its LayerPatcher context (InvokeAI), both with the model cache's RAM
copy as pristine or without it (ours then snapshots each touched weight, InvokeAI saves each
original to RAM). Each run is profiled with torch.profiler and the ops' own time is summed by
kind (with one thread an op's self CPU time is its wall time; `@`, `*` and `+` count as the
aten ops they call); the rest of the wall time is Python, file reads and hashing. The floor is
the same GEMMs alone: for every targeted layer, an fp32 `mm` of rank-64 factors (two rank-32
LoRAs) into a preallocated output, and one read of each pristine plus one write of the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# aten ops by what they do (self CPU time: with one thread, the op's own wall time)
KINDS = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
    "copies and casts": ("aten::copy_", "aten::cat", "aten::clone", "aten::_to_copy", "aten::empty",
                         "aten::empty_strided", "aten::fill_", "aten::zero_"),
    "elementwise math": ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::div"),
    "finite checks": ("aten::aminmax", "aten::isfinite", "aten::all", "aten::any", "aten::ne", "aten::eq",
                      "aten::abs", "aten::isnan"),
}


def by_kind(prof: torch.profiler.profile, wall: float) -> dict[str, float]:
    """Seconds per kind of op; "not in ops" is the rest of the wall time (Python, file I/O, allocator)."""
    out: dict[str, float] = {}
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), "other ops")
        out[kind] = out.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    out["not in ops (Python, file reads, hashing)"] = max(0.0, wall - sum(out.values()))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def gemm_floor(model: Any, index: Any, dtype: torch.dtype, rank: int = 64, repeats: int = 3) -> dict[str, float]:
    """Seconds for the merge's GEMMs alone (fp32, rank `rank`, into preallocated outputs); for one
    read of every pristine plus one write of every result in the weight dtype (the memory floor);
    and, for weights not in fp32, the two casts an fp32 accumulation needs (pristine rows into an
    fp32 block, the block rounded back), in the merge's own row blocks."""
    from studio.lora.merge import CPU_ROW_BLOCK_BYTES

    gemm, traffic, casts = [], [], []
    targets = index.kohya_targets()
    for _ in range(repeats):
        g = m = c = 0.0
        for info in targets:
            rows, cols = info.shape[0], int(torch.tensor(info.shape[1:]).prod())
            up, down, out = torch.randn(rows, rank), torch.randn(rank, cols), torch.empty(rows, cols)
            t0 = time.perf_counter()
            torch.mm(up, down, out=out)
            g += time.perf_counter() - t0
            src = model.pristine(info.component, f"{info.path}.weight").reshape(rows, cols)
            dst = torch.empty(rows, cols, dtype=dtype)
            dst.fill_(0)  # fault the pages in first: an apply writes into existing weights
            t0 = time.perf_counter()
            dst.copy_(src)
            m += time.perf_counter() - t0
            if dtype != torch.float32:
                step = max(64, CPU_ROW_BLOCK_BYTES // (4 * cols) // 64 * 64)
                block = torch.empty(min(step, rows), cols)
                t0 = time.perf_counter()
                for r0 in range(0, rows, step):
                    n = min(step, rows - r0)
                    block[:n].copy_(src[r0:r0 + n])
                    dst[r0:r0 + n].copy_(block[:n])
                c += time.perf_counter() - t0
        gemm.append(g)
        traffic.append(m)
        casts.append(c)
    flops = sum(2 * i.shape[0] * int(torch.tensor(i.shape[1:]).prod()) * rank for i in targets)
    return {"gemm_seconds": statistics.median(gemm), "gflop": flops / 1e9,
            "gflops": flops / 1e9 / statistics.median(gemm), "read_write_seconds": statistics.median(traffic),
            "cast_in_out_seconds": statistics.median(casts)}


def main(argv: list[str] | None = None) -> None:
    from bench import _invokeai_peer as inv
    from bench._kohya_files import LoraSpec, ensure_loras
    from bench._sdxl_random import build_sdxl
    from bench.lora_switch import DTYPES, cold_invokeai, cold_ours
    from studio.lora.keymap import ModelIndex
    from studio.paths import app_dirs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="profiled runs per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--invokeai-site", default=None)
    parser.add_argument("--lora-dir", type=Path, default=None)
    parser.add_argument("--no-snapshot", action="store_true",
                        help="only the variants with the RAM copy given (the others hold a second weight copy)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device("cpu")
    model = build_sdxl(dtype, device, reduced=args.reduced)
    index = ModelIndex.from_modules(model.components)
    specs = [LoraSpec("reduced" if args.reduced else "sdxl", 32, 16.0, "bf16" if args.dtype == "bf16" else "fp16", s)
             for s in (1, 2, 3, 4)]
    paths, _ = ensure_loras(args.lora_dir or app_dirs().cache / "bench-loras", index, specs, model.weight_std)
    variants = {"ours (RAM copy given)": lambda: cold_ours(model, index, paths, True, device)}
    if not args.no_snapshot:
        variants["ours (snapshot)"] = lambda: cold_ours(model, index, paths, False, device)
    site = inv.find_site(args.invokeai_site)
    if site is not None:
        peer = inv.InvokeAIPeer(inv.import_invokeai(site), model.components, dtype,
                                inv.cached_state(model.components, model.pristine))
        variants["invokeai (RAM copy given)"] = lambda: cold_invokeai(peer, paths, True, device)
        if not args.no_snapshot:
            variants["invokeai (saves originals)"] = lambda: cold_invokeai(peer, paths, False, device)
    result: dict[str, Any] = {"model": model.label, "dtype": args.dtype, "threads": args.threads,
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "variants": {}}
    for fn in variants.values():  # warm-up: first calls, allocator
        fn()
    samples: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {k: [] for k in variants}
    for _ in range(args.runs):  # interleaved
        for name, fn in variants.items():
            gc.collect()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                seconds = fn()
            samples[name].append((seconds, by_kind(prof, seconds["seconds"])))
    for name, runs in samples.items():
        kinds = {k for _, b in runs for k in b}
        result["variants"][name] = {
            "seconds": statistics.median(s["seconds"] for s, _ in runs),
            "read": statistics.median(s["read"] for s, _ in runs),
            "apply": statistics.median(s["apply"] for s, _ in runs),
            "by_kind": {k: statistics.median(b.get(k, 0.0) for _, b in runs) for k in kinds}}
    result["floor"] = gemm_floor(model, index, dtype)
    print(f"{model.label}, {args.dtype}, {args.threads} thread(s), CPU capability {result['cpu_capability']}; "
          f"medians of {args.runs} profiled runs (torch.profiler adds a little to each)")
    for name, v in result["variants"].items():
        parts = ", ".join(f"{k} {s:.2f}" for k, s in sorted(v["by_kind"].items(), key=lambda kv: -kv[1]) if s >= 0.01)
        print(f"- {name}: {v['seconds']:.2f} s (read {v['read']:.2f}, apply {v['apply']:.2f}); {parts}")
    f = result["floor"]
    print(f"- floor: the GEMMs alone {f['gemm_seconds']:.2f} s ({f['gflop']:.0f} GFLOP at {f['gflops']:.0f} GFLOPS), "
          f"reading pristine + writing the result once {f['read_write_seconds']:.2f} s, "
          f"the fp32 block's cast in and out {f['cast_in_out_seconds']:.2f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
