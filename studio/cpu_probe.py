"""Which dtype this CPU really runs fast: bf16 only with native bf16 that a short timed probe confirms.

Why not simply bf16: on an AVX2-only EPYC (no avx512_bf16, oneDNN bf16 off) bf16 matrix products ran
at 0.3 GFLOPS against 21.7 for fp32 and a 3x3 conv 111x slower, so one default generate of the demo
model took 170.8 s in bf16 against 51.8 s in fp32 (issue 9). Where the CPU has avx512_bf16 or AMX,
bf16 GEMMs run ~1.7x faster than fp32 and the weights take half the RAM (DESIGN.md §8).

The answer is cached per machine in the cache folder, keyed by what changes it: the CPU model and
its flags, the torch version and kernel capability, and the environment variables that cap the
kernels (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`). Nothing runs at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_NAME = "cpu-precision.json"
PROBE_VERSION = 1  # bump when the probe or the rule changes: older cached answers no longer match
# bf16 is kept while the probe runs it at least this fast relative to fp32: at a tie it still halves
# the weights' RAM, and 0.8 keeps the choice within the issue's 1.3x of the faster dtype.
MIN_BF16_SPEEDUP = 0.8
ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")
_NATIVE_FLAGS = (("amx_bf16", "AMX_BF16"), ("avx512_bf16", "AVX512_BF16"), ("bf16", "ARM BF16"))
_KEY_FLAGS = ("avx", "amx", "bf16", "fma", "f16c", "sve", "asimd", "neon")
_MAX_ENTRIES = 8


@dataclass(frozen=True)
class Capability:
    """What the CPU and torch's kernels say before anything is timed."""

    native_bf16: bool
    label: str  # "AVX512_BF16", "AMX_BF16", or torch's capability ("AVX2", "AVX512", "DEFAULT", ...)
    detail: str = ""  # why not native, when the CPU has the instructions but the kernels may not use them


@dataclass(frozen=True)
class ProbeResult:
    """Best-of-a-few seconds per op and dtype: a matmul and a 3x3 conv, the two ops generate spends on."""

    matmul_fp32: float
    matmul_bf16: float
    conv_fp32: float
    conv_bf16: float
    seconds: float  # the probe's own wall time

    @property
    def matmul_speedup(self) -> float:
        return self.matmul_fp32 / max(self.matmul_bf16, 1e-9)

    @property
    def conv_speedup(self) -> float:
        return self.conv_fp32 / max(self.conv_bf16, 1e-9)

    @property
    def speedup(self) -> float:
        """bf16 against fp32, > 1 when bf16 is faster: the geometric mean of the two ops."""
        return math.sqrt(self.matmul_speedup * self.conv_speedup)


@dataclass(frozen=True)
class CpuChoice:
    bf16: bool  # False: fp32
    reason: str  # one line for the model line and the report: "bf16: AVX512_BF16 native, probe ..."
    cached: bool = False


def _cpuinfo() -> tuple[str, list[str]]:
    """(CPU model name, flags) from /proc/cpuinfo; elsewhere the platform's name and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), []
    name, flags = "", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not name and key in ("model name", "hardware", "cpu part"):
            name = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = value.split()
        if name and flags:
            break
    return name or platform.processor() or platform.machine(), flags


def _onednn_bf16() -> bool:
    """oneDNN's own answer; it honours ONEDNN_MAX_CPU_ISA, unlike the CPU flags."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def detect_capability() -> Capability:
    """Native bf16 = the CPU has bf16 instructions and oneDNN, as capped by the environment, uses them."""
    isa = torch.backends.cpu.get_cpu_capability()
    flags = set(_cpuinfo()[1])
    native = next((label for flag, label in _NATIVE_FLAGS if flag in flags), None)
    if native is None:
        return Capability(False, isa)
    if not _onednn_bf16():
        capped = ", ".join(f"{v}={os.environ[v]}" for v in ENV_VARS if os.environ.get(v))
        return Capability(False, isa, f"{native.lower()} " + (f"capped by {capped}" if capped else
                                                                "present, but oneDNN has no bf16 kernels for it"))
    return Capability(True, native)


def machine_key() -> dict[str, object]:
    """Everything that changes the answer; a cached answer is reused only for an equal key."""
    name, flags = _cpuinfo()
    return {"probe": PROBE_VERSION, "cpu": name, "machine": platform.machine(),
            "flags": sorted(f for f in flags if any(part in f for part in _KEY_FLAGS)),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "env": {v: os.environ.get(v, "") for v in ENV_VARS}}


def _best_of(fn: Callable[[], object], budget_s: float, reps: int = 10) -> float:
    """Minimum wall time of `fn` after one warm-up call; stops early once `budget_s` is spent."""
    fn()
    best, spent = math.inf, 0.0
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def run_probe(budget_s: float = 0.1) -> ProbeResult:
    """Time a 256^3 matmul and a 32->32 3x3 conv on 32x32 in fp32 and bf16 (~0.05 s with native bf16,
    ~0.5 s where bf16 is emulated: each op stops repeating once its budget is spent).

    On one thread: the kernels' ISA decides the ratio, and with two threads on a busy 2-core machine
    every op waited a scheduler tick for its second thread (measured: fp32 0.3 ms or 20-48 ms, at random).
    """
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    times: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time_ops(gen, budget_s, times)
    finally:
        torch.set_num_threads(threads)
    return ProbeResult(**times, seconds=time.perf_counter() - started)


def _time_ops(gen: torch.Generator, budget_s: float, times: dict[str, float]) -> None:
    with torch.inference_mode():
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a = torch.randn(256, 256, generator=gen).to(dtype)
            b = torch.randn(256, 256, generator=gen).to(dtype)
            x = torch.randn(1, 32, 32, 32, generator=gen).to(dtype)
            w = torch.randn(32, 32, 3, 3, generator=gen).to(dtype)
            times[f"matmul_{tag}"] = _best_of(lambda: torch.mm(a, b), budget_s)
            times[f"conv_{tag}"] = _best_of(lambda: torch.nn.functional.conv2d(x, w, padding=1), budget_s)


def _ratio(speedup: float) -> str:
    if speedup >= 1.0:
        return f"{speedup:.1f}x faster"
    slower = 1.0 / speedup
    return f"{slower:.1f}x slower" if slower < 10 else f"{slower:.0f}x slower"


def decide(cap: Capability, probe: ProbeResult) -> CpuChoice:
    """bf16 only with native bf16 and a probe that does not run it much slower than fp32."""
    ops = f"matmul {_ratio(probe.matmul_speedup)}, 3x3 conv {_ratio(probe.conv_speedup)}"
    measured = f"probe bf16 {_ratio(probe.speedup)} than fp32 ({ops})"
    if not cap.native_bf16:
        why = f"no native bf16 on this CPU ({cap.label}{'; ' + cap.detail if cap.detail else ''})"
        return CpuChoice(False, f"fp32: {why}, {measured}")
    if probe.speedup < MIN_BF16_SPEEDUP:
        return CpuChoice(False, f"fp32: {cap.label} reported native, but {measured}")
    return CpuChoice(True, f"bf16: {cap.label} native, {measured}")


def _digest(key: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, entries: dict) -> None:
    """Atomic, so two processes probing at once leave one whole file; a read-only cache only costs a probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cpu-precision-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not save the CPU precision probe to %s: %s", path, err)


def choose_cpu_precision(cache_dir: Path | None, *, capability: Callable[[], Capability] | None = None,
                         probe: Callable[[], ProbeResult] | None = None,
                         key: Callable[[], dict[str, object]] | None = None) -> CpuChoice:
    """The cached answer for this machine key, else detect + probe + decide (and cache it).

    `capability`, `probe` and `key` default to this module's detect_capability, run_probe and machine_key.
    """
    capability, probe = capability or detect_capability, probe or run_probe
    machine = (key or machine_key)()
    digest = _digest(machine)
    path = cache_dir / CACHE_NAME if cache_dir is not None else None
    entries = _read(path) if path is not None else {}
    hit = entries.get(digest)
    if isinstance(hit, dict) and hit.get("key") == machine and isinstance(hit.get("reason"), str):
        return CpuChoice(bool(hit.get("bf16")), hit["reason"], cached=True)
    cap, result = capability(), probe()
    choice = decide(cap, result)
    log.info("CPU precision %s (probe took %.2fs)", choice.reason, result.seconds)
    if path is not None:
        entries[digest] = {"key": machine, "bf16": choice.bf16, "reason": choice.reason, "when": time.time(),
                           "capability": asdict(cap), "probe": asdict(result)}
        valid = [(k, v) for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("when"), float)]
        _write(path, dict(sorted(valid, key=lambda kv: -kv[1]["when"])[:_MAX_ENTRIES]))
    return choice
