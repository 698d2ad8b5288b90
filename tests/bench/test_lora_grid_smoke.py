"""The LoRA grid benchmark's --tiny flow, in-process: exactness and the work each order does, never timings.

Same flow as the SDXL-scale run (bench/lora_grid.py), partial scenario (the second LoRA only on the
UNet's output blocks), on the embedded tiny model in bf16.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from studio.paths import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of scripts, not an installed package

from bench.lora_grid import Config, markdown, run  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run(Config(scenario="partial", tiny=True, dtype="bf16", sample=12, threads=1,
                      lora_dir=tmp_path_factory.mktemp("bench-loras")))


def test_every_cell_of_ours_is_the_once_rounded_exact_sum(result):
    for side in ("best", "row_by_row"):
        first, again = result["ours"][side]
        assert len(first) == len(again) == 25
        for row in first:  # the first pass of each side is checked cell by cell; the second is timed only
            assert row["exact"]["max_ulp"] <= 1, (side, row)
    assert result["after_clear"]["differing"] == 0


def test_the_best_order_rewrites_less_and_the_cost_model_is_what_the_patcher_did(result):
    s = result["summary"]
    assert result["order"]["best"].startswith("snake") or result["order"]["best"].startswith("greedy")
    assert s["best"]["bytes"] == result["order"]["best_bytes"] < result["order"]["row_by_row_bytes"] == \
        s["row_by_row"]["bytes"]
    assert s["best"]["tensors"] < s["row_by_row"]["tensors"]


def test_diffusers_ran_every_cell_and_the_table_renders(result):
    assert len(result["diffusers"]) == 25 and len(result["diffusers_load"]) == 2
    assert result["summary"]["diffusers"]["exact_worst"]["tensors"] == 12
    text = markdown(result)
    assert "ours, best order" in text and "diffusers" in text and "row by row / best" in text
