"""Model load: the report says what it was made of, and a first load pays no needless gc pass."""

from __future__ import annotations

import gc

import studio.session as session_module
from studio.choices import Precision
from studio.report import LOAD_PART_LABELS, load_breakdown
from studio.request import GenerationRequest
from studio.session import Session
from studio.settings import Settings

# no separate VAE here; the live preview's fit is on by default and part of the load
PARTS = {"imports", "read_build", "hash", "placement", "lora_bind", "preview"}
assert PARTS <= set(LOAD_PART_LABELS)


def test_load_parts_add_up_and_a_second_load_imports_nothing(session_dirs, monkeypatch):
    collections = []
    real = session_module.release_freed_memory
    monkeypatch.setattr(session_module, "release_freed_memory", lambda: (collections.append(1), real()))
    session = Session(Settings(device="cpu", precision=Precision.FP32), session_dirs)
    try:
        first = session.load_model()
        assert collections == []  # nothing was loaded before: the unload had nothing to free
        assert set(first.load_parts) == PARTS
        assert sum(first.load_parts.values()) <= first.load_seconds + 1e-3
        assert sum(first.load_parts.values()) >= 0.9 * first.load_seconds  # the parts are what it was spent on
        assert gc.get_freeze_count() > 0  # the import-time objects left the collector's walk
        second = session.load_model()
        assert collections == [1]  # the switch freed the first model
        assert second.load_parts["imports"] < 0.05  # already imported in this process
        assert first.to_dict()["load_parts"].keys() == PARTS
    finally:
        session.close()


def test_a_cold_generation_reports_what_model_load_was_made_of(session_dirs, tmp_path):
    session = Session(Settings(device="cpu", precision=Precision.FP32), session_dirs)
    try:
        report = session.generate(GenerationRequest(prompt="x", seed=1, steps=1, width=64, height=64),
                                  out_path=tmp_path / "a.png").report
    finally:
        session.close()
    assert report.phases["model_load"] >= sum(report.model["load_parts"].values()) - 1e-3
    assert report.model["load_parts"].keys() == PARTS
    assert load_breakdown(report.model).startswith("imports ")
    assert "model_load: imports" in report.summary()
