"""The LoRA switching benchmark's --tiny flow, in-process: its exactness results, never its timings.

Same scenario as the SDXL-scale run (bench/lora_switch.py) on the embedded tiny model in bf16.
The patcher's CPU row-block path only starts above 1 MiB of fp32 per tensor, which no tiny layer
reaches, so the block size is shrunk here to run the tiny layers through it as well.
InvokeAI's patcher is an optional peer, loaded from an installed wheel named by $INVOKEAI_SITE
(bench/_invokeai_peer.py); without it those tests skip and say how to get it.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from studio.paths import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of scripts, not an installed package

from bench import _invokeai_peer as inv  # noqa: E402
from bench.lora_switch import REFERENCE, SCENARIO, Config, run  # noqa: E402

STEPS = [name for name, _ in SCENARIO + REFERENCE]
CLEARS = [name for name, stack in SCENARIO + REFERENCE if not stack]


def _run(tmp_path_factory: pytest.TempPathFactory, **kw: Any) -> dict[str, Any]:
    import studio.lora.merge as merge

    mp = pytest.MonkeyPatch()
    mp.setattr(merge, "CPU_ROW_BLOCK_BYTES", 2048)  # 64-row blocks: tiny ff/proj layers go through them
    try:
        return run(Config(tiny=True, dtype="bf16", rounds=0, threads=1, sample=40,
                          lora_dir=tmp_path_factory.mktemp("bench-loras"), **kw))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory, invokeai_site="")  # "": never InvokeAI here, even with $INVOKEAI_SITE set


@pytest.fixture(scope="module")
def with_invokeai(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if inv.find_site() is None:
        pytest.skip(f"InvokeAI not installed: set ${inv.ENV} to a folder made with `pip install --no-deps "
                    f"--target DIR invokeai=={inv.VERSION}` to run the InvokeAI peer")
    return _run(tmp_path_factory, diffusers=False)


@pytest.mark.parametrize("side", ["ours_off", "ours_on"])
def test_ours_is_the_once_rounded_exact_sum_after_every_step(result, side):
    row = result["rounds"][0][side]
    assert set(row) == set(STEPS)
    for step in STEPS:
        exact = row[step]["exact"]
        assert exact["tensors"] == 40, step
        # fp32 accumulation rounded once: equal to the float64 sum rounded once, except where that sum
        # sits within fp32 error of a bf16 rounding midpoint (then one ulp, a few per million elements)
        assert exact["max_ulp"] <= 1, (step, exact)
        assert exact["elements_off"] <= max(2, exact["elements"] // 100_000), (step, exact)


@pytest.mark.parametrize("side", ["ours_off", "ours_on"])
def test_ours_clears_bit_exactly(result, side):
    for step in CLEARS:
        check = result["rounds"][0][side][step]["pristine"]
        assert check["tensors"] == result["model"]["targets"] and check["differing"] == 0, (step, check)
    assert result["after_close"]["differing"] == 0


def test_ours_skips_the_same_stack_and_moves_touch_only_that_loras_layers(result):
    row = result["rounds"][0]["ours_off"]
    assert row["same stack again (A -> A)"]["touched"] == 0
    assert row["same stack again (A -> A)"]["skipped"] == result["model"]["targets"]
    assert row["move one weight (LoRA 3 0.9 -> 0.5)"]["touched"] == result["model"]["targets"]  # LoRA 3 is on all


def test_diffusers_side_ran_and_its_subtraction_is_measured(result):
    """diffusers 0.42 unfuses by subtraction (research/diffusers.md 0.1): after its clear the weights drift.

    If this starts failing because nothing differs, diffusers now restores exactly: update docs/BENCHMARKS.md.
    """
    row = result["rounds"][0]["diffusers"]
    assert set(row) == {name for name, _ in SCENARIO}
    assert all(row[step]["exact"]["tensors"] == 40 for step in row)
    clear = row["clear"]["pristine"]
    assert clear["tensors"] == result["model"]["targets"]
    assert 0 < clear["differing"] and clear["max_abs"] > 0
    assert len(result["rounds"][0]["diffusers_load"]) == 4


def test_the_summary_has_every_step_and_target(result):
    steps = result["summary"]["steps"]
    assert list(steps) == STEPS
    for side in ("ours_off", "ours_on"):
        targets = result["summary"]["targets"][side]
        assert targets["bit_exact_restore"] == {"checked": True, "met": True}
        assert set(targets) == {"apply_and_switch_5x", "bit_exact_restore", "same_stack_under_10ms",
                                "move_le_reapply_one"}


def test_without_invokeai_the_run_says_it_was_not_measured(result):
    assert result["invokeai"]["measured"] is False and "not measured" in result["invokeai"]["reason"]
    assert "invokeai" not in result["rounds"][0]


def test_cold_first_apply_rows_and_the_model_left_clean(result):
    cold = result["rounds"][0]["cold"]
    assert {"ours (RAM copy given)", "ours (snapshot)", "diffusers (2 loads + apply A)"} <= set(cold)
    assert all(row["seconds"] > 0 for row in cold.values())
    assert result["after_close"]["differing"] == 0


def test_invokeai_patches_every_layer_and_restores_bit_exactly(with_invokeai):
    info = with_invokeai["invokeai"]
    assert info["measured"] and info["version"] == inv.VERSION
    assert info["warnings"] == 0, info["warning_examples"]  # it skips layers it cannot place, with a warning
    row = with_invokeai["rounds"][0]["invokeai"]
    assert set(row) == {name for name, _ in SCENARIO}
    for step, _ in SCENARIO:
        exact = row[step]["exact"]
        # a layer left unpatched would be off in nearly every element; double rounding leaves ~20% off
        assert exact["tensors"] == 40 and exact["elements_off"] < exact["elements"] // 2, (step, exact)
    clear = row["clear"]["pristine"]
    assert clear["tensors"] == with_invokeai["model"]["targets"] and clear["differing"] == 0
    assert {"invokeai (RAM copy given)", "invokeai (saves originals)"} <= set(with_invokeai["rounds"][0]["cold"])


def test_invokeai_rounds_each_loras_delta_to_bf16(with_invokeai):
    """InvokeAI adds each LoRA's delta in the weight dtype: in bf16 some elements miss the once-rounded sum.

    If this fails because nothing is off, InvokeAI now accumulates before rounding: update docs/BENCHMARKS.md.
    """
    exact = with_invokeai["rounds"][0]["invokeai"]["apply A (1+2)"]["exact"]
    assert exact["elements_off"] > 0


def test_the_table_names_the_cpu_on_every_row_and_the_run_records_the_load(result):
    from bench._report import markdown

    capability = result["machine"]["cpu_capability"]
    rows = [line for line in markdown(result).splitlines() if line.startswith("| ") and " / ours off" not in line]
    steps = [line for line in rows if line.split(" | ")[0][2:] in STEPS]
    assert len(steps) == len(STEPS) and all(capability in line for line in steps)
    assert len(result["machine"]["loadavg_start"]) == 3 and len(result["machine"]["loadavg_end"]) == 3
