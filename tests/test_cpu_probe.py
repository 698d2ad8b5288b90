"""Precision auto on the CPU: bf16 only with native bf16 that the probe confirms, cached per machine."""

from __future__ import annotations

import json

import pytest
import torch

from studio import cpu_probe
from studio.cpu_probe import CACHE_NAME, Capability, ProbeResult, choose_cpu_precision, decide
from studio.errors import SettingsError
from studio.runtime import resolve_runtime

NATIVE = Capability(True, "AVX512_BF16")
AVX2 = Capability(False, "AVX2")
# fp32 / bf16 seconds as measured on the two kinds of CPU (this machine, and under ONEDNN_MAX_CPU_ISA=AVX2)
FAST = ProbeResult(matmul_fp32=4e-4, matmul_bf16=1e-4, conv_fp32=1.8e-4, conv_bf16=1.3e-4, seconds=0.04)
SLOW = ProbeResult(matmul_fp32=4e-4, matmul_bf16=3.2e-2, conv_fp32=2.5e-4, conv_bf16=2.0e-2, seconds=0.35)
KEY = {"probe": 1, "cpu": "Test CPU", "flags": ["avx2"], "torch": "2.13.0", "env": {}}


class Calls:
    """Counts calls to the injected capability and probe."""

    def __init__(self, cap: Capability, probe: ProbeResult) -> None:
        self.cap, self.result, self.n = cap, probe, 0

    def capability(self) -> Capability:
        return self.cap

    def probe(self) -> ProbeResult:
        self.n += 1
        return self.result


def test_native_bf16_with_a_fast_probe_picks_bf16_and_says_why():
    choice = decide(NATIVE, FAST)
    assert choice.bf16
    assert choice.reason == ("bf16: AVX512_BF16 native, probe bf16 2.4x faster than fp32 "
                             "(matmul 4.0x faster, 3x3 conv 1.4x faster)")


def test_no_native_bf16_picks_fp32_and_names_the_slowdown():
    choice = decide(AVX2, SLOW)
    assert not choice.bf16
    assert choice.reason.startswith("fp32: no native bf16 on this CPU (AVX2), probe bf16 80x slower than fp32")


def test_no_native_bf16_is_fp32_even_when_the_probe_is_fast():
    assert not decide(AVX2, FAST).bf16  # bf16 only where the CPU has it natively


def test_native_bf16_that_the_probe_finds_slow_is_fp32():
    choice = decide(NATIVE, SLOW)
    assert not choice.bf16 and choice.reason.startswith("fp32: AVX512_BF16 reported native, but probe bf16 80x")


def test_a_tie_keeps_bf16_and_a_clear_loss_does_not():
    tie = ProbeResult(1e-3, 1.2e-3, 1e-3, 1.2e-3, 0.01)  # bf16 1.2x slower: within the margin, half the RAM
    loss = ProbeResult(1e-3, 1.4e-3, 1e-3, 1.4e-3, 0.01)
    assert decide(NATIVE, tie).bf16 and not decide(NATIVE, loss).bf16


def test_the_answer_is_cached_per_machine(tmp_path):
    calls = Calls(NATIVE, FAST)
    first = choose_cpu_precision(tmp_path, capability=calls.capability, probe=calls.probe, key=lambda: KEY)
    second = choose_cpu_precision(tmp_path, capability=calls.capability, probe=calls.probe, key=lambda: KEY)
    assert calls.n == 1 and first.bf16 and second.bf16
    assert (first.cached, second.cached) == (False, True) and first.reason == second.reason
    saved = json.loads((tmp_path / CACHE_NAME).read_text())
    (entry,) = saved.values()
    assert entry["key"] == KEY and entry["probe"]["matmul_bf16"] == FAST.matmul_bf16


def test_a_stale_key_probes_again_and_keeps_the_other_machines_answer(tmp_path):
    native = Calls(NATIVE, FAST)
    choose_cpu_precision(tmp_path, capability=native.capability, probe=native.probe, key=lambda: KEY)
    capped = {**KEY, "env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}  # same CPU, kernels capped: another answer
    avx2 = Calls(AVX2, SLOW)
    choice = choose_cpu_precision(tmp_path, capability=avx2.capability, probe=avx2.probe, key=lambda: capped)
    assert avx2.n == 1 and not choice.bf16 and not choice.cached
    again = choose_cpu_precision(tmp_path, capability=native.capability, probe=native.probe, key=lambda: KEY)
    assert native.n == 1 and again.cached and again.bf16
    assert len(json.loads((tmp_path / CACHE_NAME).read_text())) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"abc": {"key": "wrong"}}'])
def test_a_broken_or_foreign_cache_file_only_costs_a_probe(tmp_path, content):
    (tmp_path / CACHE_NAME).write_text(content)
    calls = Calls(AVX2, SLOW)
    choice = choose_cpu_precision(tmp_path, capability=calls.capability, probe=calls.probe, key=lambda: KEY)
    assert calls.n == 1 and not choice.bf16
    assert choose_cpu_precision(tmp_path, capability=calls.capability, probe=calls.probe, key=lambda: KEY).cached


def test_the_machine_key_changes_with_the_kernel_caps(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = cpu_probe.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_probe.machine_key() != plain
    assert plain["torch"] == torch.__version__ and plain["cpu"]


def test_the_real_probe_is_short_and_times_both_dtypes():
    result = cpu_probe.run_probe()
    assert result.seconds < 2.0  # ~0.05 s with native bf16, ~0.4 s where bf16 is emulated
    assert min(result.matmul_fp32, result.matmul_bf16, result.conv_fp32, result.conv_bf16) > 0
    assert torch.get_num_threads() >= 1
    cap = cpu_probe.detect_capability()
    assert cap.label and (not cap.native_bf16 or cap.label.endswith("BF16"))


def test_precision_auto_on_the_cpu_asks_the_probe_and_an_explicit_one_does_not(tmp_path, monkeypatch):
    calls = Calls(AVX2, SLOW)
    monkeypatch.setattr(cpu_probe, "detect_capability", calls.capability)
    monkeypatch.setattr(cpu_probe, "run_probe", calls.probe)
    monkeypatch.setattr(cpu_probe, "machine_key", lambda: KEY)
    auto = resolve_runtime("cpu", "auto", tmp_path)
    assert auto.dtype == torch.float32 and auto.reason.startswith("fp32: no native bf16 on this CPU (AVX2)")
    asked = resolve_runtime("cpu", "bf16", tmp_path)
    assert asked.dtype == torch.bfloat16 and asked.reason == "bf16: asked for (precision = bf16)"
    assert calls.n == 1
    with pytest.raises(SettingsError, match="fp16 on the CPU"):
        resolve_runtime("cpu", "fp16", tmp_path)


def test_the_test_session_runs_in_the_precision_this_cpu_runs_fast(tiny_session, session_dirs, tmp_path):
    """The shared session is precision auto: what the cached probe picked for this machine, and its report says so."""
    choice = choose_cpu_precision(session_dirs.cache)
    assert choice.cached  # the session resolved it first; the test reads the same answer back
    assert tiny_session.runtime.dtype == (torch.bfloat16 if choice.bf16 else torch.float32)
    from studio.request import GenerationRequest

    report = tiny_session.generate(GenerationRequest(prompt="x", seed=1, steps=1, width=64, height=64),
                                   out_path=tmp_path / "p.png").report
    assert report.dtype_reason == tiny_session.runtime.reason == choice.reason
    assert report.to_dict()["dtype_reason"].startswith(("bf16: ", "fp32: "))
