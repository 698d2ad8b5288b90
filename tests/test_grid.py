"""X/Y/Z grids: axes, cell requests, the visiting order, and every cell equal to its request run alone."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from studio.errors import SettingsError
from studio.grid import Axis, cell_request, parse_axis, plan_grid, run_grid, summary
from studio.grid_order import row_major, snake
from studio.infotext import read_png_infotext
from studio.request import GenerationRequest

KOHYA, PEFT, LOCON = "demo-kohya-warm", "demo-peft-cool", "demo-locon-grain"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_axes_parse_as_the_issue_writes_them():
    assert parse_axis("lora:demo-kohya-warm=0,0.5,1") == Axis("lora", ("0", "0.5", "1"), KOHYA)
    assert parse_axis('lbw:x=INS,"1,0,0,0,0,0,0,0,0,1,1,1"').values == ("INS", "1,0,0,0,0,0,0,0,0,1,1,1")
    assert parse_axis("sampler=Euler, DPM++ 2M").values == ("Euler", "DPM++ 2M")
    assert parse_axis("size=512x512,768x512").kind == "size"
    for bad in ("lora=1,2", "colour=1,2", "seed", "lora:=1"):
        with pytest.raises(SettingsError):
            parse_axis(bad)


def test_cell_requests_fold_tags_replace_prompts_and_keep_lbw():
    base = GenerationRequest(prompt=f"a cat <lora:{KOHYA}:0.4:lbw=INS>", seed=5, steps=3, loras=((PEFT, 0.5),))
    axes = [parse_axis(f"lora:{KOHYA}=0,1"), parse_axis("prompt_sr=cat,dog"), parse_axis("size=64x64,128x64")]
    r = cell_request(base, axes, (1, 1, 1))
    assert r.prompt == "a dog" and (r.width, r.height) == (128, 64)
    assert r.loras == ((PEFT, 0.5), (KOHYA, 1.0, "lbw=INS"))  # the weight moved, the block weights stayed
    r = cell_request(base, [parse_axis(f"lbw:{LOCON}=OUTD"), parse_axis("cfg=7")], (0, 0, 0))
    assert r.loras[-1] == (LOCON, 1.0, "lbw=OUTD") and r.cfg == 7.0
    r = cell_request(base, [parse_axis(f'stack="<lora:{LOCON}:0.3>",""')], (1, 0, 0))
    assert r.loras == ()
    with pytest.raises(SettingsError, match="--x seed value 'abc'"):
        cell_request(base, [parse_axis("seed=1,abc")], (1, 0, 0))


def test_snake_orders_change_one_axis_per_step():
    for nesting in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        order = snake((3, 2, 2), nesting)
        assert sorted(order) == sorted(row_major((3, 2, 2)))
        assert all(sum(a != b for a, b in zip(p, q)) == 1 for p, q in zip(order, order[1:]))


@pytest.fixture(scope="module")
def grid(tiny_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    base = GenerationRequest(prompt="a cat", seed=11, steps=2, width=64, height=64, loras=((PEFT, 0.8),))
    axes = [parse_axis(f"lora:{KOHYA}=0,0.5,1"), parse_axis(f"lbw:{PEFT}=ALL,OUTD")]
    # The cost model counts from a clean model; the shared session may hold an earlier test's stack,
    # which the first cell would also take off (bytes the grid's order does not decide).
    tiny_session.generate(GenerationRequest(prompt="clean", seed=1, steps=1, width=64, height=64),
                          out_path=out / "clean.png")
    plan = plan_grid(tiny_session, base, axes)
    seen = []
    result = run_grid(tiny_session, plan, out, on_cell=lambda i, n, cell: seen.append((i, n, cell)))
    return plan, result, seen


def test_every_cell_is_pixel_identical_to_its_request_run_alone(grid, tiny_session, tmp_path):
    plan, result, _ = grid
    data = json.loads(result.json.read_text())
    for row in reversed(data["cells"]):  # another order than the grid's, after other work
        alone = tiny_session.generate(GenerationRequest.from_dict(row["request"]),
                                      out_path=tmp_path / f"alone-{row['x']}-{row['y']}.png")
        assert np.array_equal(_pixels(alone.paths[0]), _pixels(result.out_dir / row["file"])), row["file"]


def test_grid_files_metadata_and_progress(grid):
    plan, result, seen = grid
    data = json.loads(result.json.read_text())
    assert [(i, n) for i, n, _ in seen] == [(i, 6) for i in range(1, 7)]
    assert [c for _, _, c in seen] == plan.order
    assert len(data["cells"]) == 6 and data["grid"] == "grid.png" and not data["stopped"]
    assert {k for k in data["cells"][0]} >= {"file", "x", "y", "z", "request", "report"}
    for row in data["cells"]:
        info = read_png_infotext(result.out_dir / row["file"])
        assert GenerationRequest.from_dict(row["request"]) == info.to_request()  # full metadata in each cell
    picture = Image.open(result.image)
    assert picture.width > 3 * 192 and picture.height > 2 * 192  # 64-px cells scaled up, labels around them


def test_the_chosen_order_rewrites_less_than_row_by_row_and_the_report_says_so(grid):
    plan, result, _ = grid
    lora = result.lora
    assert plan.planned_bytes < plan.naive_bytes
    assert lora["bytes_written"] == plan.planned_bytes  # the cost model is what the patcher did
    assert lora["row_by_row_seconds_estimate"] > 0 and lora["seconds"] > 0
    text = summary(result)
    assert "measured" in text and "estimate" in text


def test_steps_sampler_and_size_axes_make_a_3d_grid_whose_cells_match_their_runs_alone(tiny_session, tmp_path):
    base = GenerationRequest(prompt="a cat", seed=4, steps=2, width=64, height=64, loras=((KOHYA, 0.7),))
    axes = [parse_axis("steps=1,2"), parse_axis("sampler=Euler,DPM++ 2M"), parse_axis("size=64x64,96x64")]
    plan = plan_grid(tiny_session, base, axes)
    result = run_grid(tiny_session, plan, tmp_path / "grid")
    assert plan.shape == (2, 2, 2) and len(result.results) == 8
    for cell, done in result.results.items():
        request = plan.jobs[cell].request
        assert (request.steps, request.sampler, request.width) == ((1, 2)[cell[0]], ("Euler", "DPM++ 2M")[cell[1]],
                                                                   (64, 96)[cell[2]])
        alone = tiny_session.generate(request, out_path=tmp_path / f"alone-{'-'.join(map(str, cell))}.png")
        assert np.array_equal(_pixels(alone.paths[0]), _pixels(done.paths[0])), cell


def test_stop_ends_the_grid_between_cells_and_keeps_what_ran(tiny_session, tmp_path):
    base = GenerationRequest(prompt="a cat", seed=2, steps=2, width=64, height=64)
    plan = plan_grid(tiny_session, base, [parse_axis("seed=1,2,3")])
    stop = threading.Event()

    def on_cell(index, total, cell):
        if index == 2:
            stop.set()  # asked during cell 2: cell 2 still finishes, cell 3 never starts

    result = run_grid(tiny_session, plan, tmp_path, on_cell=on_cell, stop=stop)
    data = json.loads(result.json.read_text())
    assert result.stopped and data["stopped"] and len(result.results) == 2
    assert sum(row["file"] is not None for row in data["cells"]) == 2 and result.image.exists()


def test_a_bad_cell_fails_before_any_image(tiny_session, tmp_path):
    base = GenerationRequest(prompt="a cat", seed=2, steps=2, width=64, height=64)
    with pytest.raises(SettingsError, match="unknown block-weight preset"):
        plan_grid(tiny_session, base, [parse_axis(f"lbw:{KOHYA}=ALL,NOPE")])


def test_prompt_sr_must_find_its_search_text(tiny_session):
    base = GenerationRequest(prompt="a cat", seed=2, steps=2, width=64, height=64)
    with pytest.raises(SettingsError, match="not in the prompt"):
        plan_grid(tiny_session, base, [parse_axis("prompt_sr=dog,fox")])


def test_the_picture_stacks_z_and_reads_without_dejavu(tmp_path, monkeypatch):
    import studio.grid_image as grid_image

    monkeypatch.setattr(grid_image, "FONT_FILES", ("no-such-font.ttf",))  # CI without fonts: PIL's own font
    cell = tmp_path / "c.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(cell)
    cells = {(x, y, z): cell for x in range(2) for y in range(2) for z in range(2)}
    cells[(1, 1, 1)] = None  # stopped before this one
    picture = grid_image.compose(cells, ["w 0", "w 1"], ["cool 0", "cool 0.7"], ["seed 1", "seed 2"])
    assert picture.height > 2 * (2 * 192) and picture.width > 2 * 192
    assert isinstance(grid_image.font(20), grid_image.ImageFont.FreeTypeFont)  # scalable, not the 11-px bitmap
