"""Can a bf16 GEMM (fp32 accumulation inside oneDNN) replace the patcher's fp32 merge, bit for bit?

    python -m bench.bf16_gemm --out bench/results/bf16_gemm_cpu.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.bf16_gemm   # a CPU without AVX512-BF16

Our rule (DESIGN.md 4): merged = pristine + sum(w_i * delta_i), accumulated in fp32, rounded once
to the weight dtype. The patcher computes it as one fp32 addmm of the concatenated factors
(`up_i * scale_i * w_i` folded into `up`) onto the fp32 pristine, then rounds to bf16. The bf16
alternative is `torch.addmm(pristine_bf16, up_bf16, down_bf16)`: oneDNN multiplies bf16 inputs
(products exact in fp32), accumulates in fp32, adds the bf16 C and rounds once. Its inputs are
bf16, so the folded `up * scale * w` must be rounded to bf16 first, unless that fold is exact.
Per SDXL layer shape (rank 64 = two rank-32 LoRAs), this counts the elements where each way
differs from the fp32 path and from the float64 sum rounded once, and times both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

# (out, in) of the SDXL kohya targets: attention q/k/v/out at 640 and 1280, cross-attn k/v from the
# 2048-wide context, ff proj in (GEGLU, 2x the inner width) and out; TE2's MLP
SHAPES = [(640, 640), (1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120), (5120, 1280)]
FOLDS = {"user weight 0.8 x scale 0.5 (not exact in bf16)": (0.4, 0.3),
         "power-of-two weight x scale (fold exact in bf16)": (0.5, 0.25)}


def _time(fn: Any, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(rows: int, cols: int, folds: tuple[float, float], rank: int = 32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    ups = [(torch.randn(rows, rank, generator=g) * 0.002).bfloat16() for _ in folds]
    downs = [(torch.randn(rank, cols, generator=g) / cols ** 0.5).bfloat16() for _ in folds]
    up32 = torch.cat([u.float() * f for u, f in zip(ups, folds)], 1)  # the patcher's fold, in fp32
    down32 = torch.cat([d.float() for d in downs], 0)
    exact = (base.double() + up32.double() @ down32.double()).bfloat16()  # float64, rounded once

    def fp32_path() -> torch.Tensor:
        return torch.addmm(base.float(), up32, down32).bfloat16()

    up16, down16 = up32.bfloat16(), down32.bfloat16()

    def bf16_path() -> torch.Tensor:
        return torch.addmm(base, up16, down16)

    ours, bf = fp32_path(), bf16_path()
    flops = 2 * rows * cols * 2 * rank
    t32, t16 = _time(fp32_path), _time(bf16_path)
    return {"shape": [rows, cols], "elements": rows * cols,
            "fold_exact_in_bf16": bool(torch.equal(up16.float(), up32)),
            "bf16_differs_from_fp32_path": int((bf != ours).sum()),
            "fp32_path_off_exact": int((ours != exact).sum()), "bf16_off_exact": int((bf != exact).sum()),
            "fp32_seconds": t32, "bf16_seconds": t16,
            "fp32_gflops": flops / t32 / 1e9, "bf16_gflops": flops / t16 / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "threads": torch.get_num_threads(),
                              **{v: os.environ[v] for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                                 if os.environ.get(v)}, "folds": {}}
    print(f"CPU capability {result['cpu_capability']}, {result['threads']} threads")
    print("| fold | shape | bf16 differs from fp32 path | fp32 path off f64-once | bf16 off f64-once "
          "| fp32 ms | bf16 ms |\n|---|---|---|---|---|---|---|")
    for label, folds in FOLDS.items():
        rows = [compare(r, c, folds) for r, c in SHAPES]
        result["folds"][label] = rows
        for x in rows:
            print(f"| {label} | {x['shape'][0]}x{x['shape'][1]} | {x['bf16_differs_from_fp32_path']} of "
                  f"{x['elements']} | {x['fp32_path_off_exact']} | {x['bf16_off_exact']} "
                  f"| {x['fp32_seconds'] * 1e3:.1f} | {x['bf16_seconds'] * 1e3:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
