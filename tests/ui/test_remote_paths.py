"""Main's new parts of the page (History tab, model picker, Report JSON) show a visitor through the
public link no local path: the outputs folder, model files, LoRA files (issue 11, item 11).

The handlers are the app's own (found by name in the built Blocks) and get the request a visitor
through the tunnel sends: its Host is `<id>.gradio.live`. The same handler for the person at this
computer still shows the paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio.paths import TINY_MODEL_DIR
from studio.request import GenerationRequest
from ui.access import ServerInfo
from ui.app import build_app
from ui.history_tab import page_of

REMOTE = SimpleNamespace(headers={"host": "abcd.gradio.live"}, session_hash="visitor")
PORT = 7860
LOCAL = SimpleNamespace(headers={"host": f"127.0.0.1:{PORT}"}, session_hash="me")


@pytest.fixture(scope="module")
def app(tiny_session, tmp_path_factory):
    """The page's handlers, after a local run with a LoRA (its JSON beside the PNG) and with a model folder."""
    models = tmp_path_factory.mktemp("my-models")
    shutil.copytree(TINY_MODEL_DIR, models / "my-sdxl")
    original = tiny_session.settings
    tiny_session.apply_settings(original.replace(model_dirs=(str(models),)))
    result = tiny_session.generate(GenerationRequest("a boat <lora:demo-kohya-warm:0.5>", steps=2, width=64,
                                                     height=64, seed=3))
    result.report.write_json(Path(result.paths[0]).with_suffix(".json"))
    blocks = build_app(tiny_session, ServerInfo(port=PORT))
    yield {fn.fn.__name__: fn.fn for fn in blocks.fns.values() if fn.fn is not None}, models, result
    tiny_session.apply_settings(original)


def test_the_history_tab_names_no_local_folder_to_a_visitor(app, tiny_session):
    handlers, _, result = app
    root = str(tiny_session.outputs_root)
    *_, note = page_of(tiny_session, 0, local=False)
    assert root not in note and "newest first" in note
    assert root in page_of(tiny_session, 0, local=True)[3]
    assert root not in handlers["open_folder"](str(result.paths[0]), REMOTE)
    picked = handlers["pick"]([str(result.paths[0])], SimpleNamespace(index=0), REMOTE)
    assert root not in str(picked[1:]) and "demo-kohya-warm" in picked[3]  # its report, without the paths


def test_the_model_picker_lists_names_not_paths_to_a_visitor(app):
    handlers, models, _ = app
    model, vae, note = handlers["rescan"](REMOTE)
    assert str(models) not in f"{model.choices} {model.value} {vae.choices} {vae.value} {note}"
    assert any("my-sdxl" in label for label, _ in model.choices)
    model, _, _ = handlers["rescan"](LOCAL)
    assert str(models / "my-sdxl") in {value for _, value in model.choices}


def test_a_visitor_gets_no_report_json_of_a_run_at_this_computer(app):
    handlers, _, result = app
    json_path = str(Path(result.paths[0]).with_suffix(".json"))
    remote = handlers["refresh_report"]([], REMOTE)
    assert json_path not in str(remote.values()) and "seed 3" in str(remote.values())
    assert json_path in str(handlers["refresh_report"]([], LOCAL).values())


def test_the_grid_tab_names_its_folder_not_its_path_to_a_visitor(app, tiny_session):
    handlers, _, _ = app
    axis = ("seed", "", "1,2")  # x: two seeds; no y, no z
    rest = ("a boat", [], "", 5, 2, 5.0, 64, 64, "Euler")
    root = str(tiny_session.outputs_root)
    for who, shows_root in ((REMOTE, False), (LOCAL, True)):
        texts = [v for v in handlers["run"](*axis, "", "", "", "", "", "", *rest, who).values() if isinstance(v, str)]
        status = next(t for t in texts if "cells" in t)
        assert (root in status) is shows_root and "2 cells" in status, status
