"""Reports kept on disk: a restarted session still has its last generations for the Report tab."""

from __future__ import annotations

import json

from studio.history import ReportHistory
from studio.paths import AppDirs
from studio.report import Report
from studio.request import GenerationRequest


def _report(seed: int) -> Report:
    return Report(request={"seed": seed}, model={"name": "tiny"}, device="cpu", dtype="bfloat16",
                  phases={"denoise": 0.1, "total": 0.2}, step_seconds=[0.1], memory={"peak_rss": 1})


def test_a_restarted_session_has_the_last_reports(tiny_session, tmp_path):
    from studio.session import Session

    dirs = AppDirs(config=tmp_path / "c", data=tmp_path / "d", cache=tiny_session.dirs.cache)
    dirs.data.mkdir()
    first = Session(tiny_session.settings, dirs)
    try:
        first.generate(GenerationRequest(prompt="kept", seed=41, steps=2), out_path=tmp_path / "a.png")
    finally:
        first.close()
    again = Session(tiny_session.settings, dirs)  # a restart: nothing loaded, the reports read back
    assert [r.request["seed"] for r in again.history] == [41]
    kept = again.history[-1]
    assert kept.phases["denoise"] > 0 and kept.step_seconds and kept.memory["peak_rss"] > 0
    assert kept.outputs == [str(tmp_path / "a.png")]


def test_the_file_keeps_the_newest_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "reports.jsonl"
    history = ReportHistory(path, keep=3)
    for seed in range(7):
        history.append(_report(seed))
    assert [r.request["seed"] for r in history] == [4, 5, 6]
    assert len(path.read_text().splitlines()) < 6  # cut back once it had grown to twice `keep`
    with path.open("a") as fh:
        fh.write('{"request": {"seed": 99}, "model": {}, "dev')  # a crash in the middle of a write
    reread = ReportHistory(path, keep=3)
    assert [r.request["seed"] for r in reread] == [4, 5, 6]
    assert json.loads(path.read_text().splitlines()[-2])["request"]["seed"] == 6
