"""`python launch.py generate` as a user runs it: subprocesses, files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from studio.infotext import read_png_infotext
from tests.demo_hashes import DEMO_SHORT_HASHES

ROOT = Path(__file__).resolve().parent.parent


def _launch(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          env=env, cwd=home.parent, timeout=300)


def test_generate_twice_gives_identical_pixels_and_parseable_metadata(tmp_path):
    home = tmp_path / "home"
    runs = [_launch("generate", "--prompt", "a cat", "--seed", "1", "--steps", "3", "--out", str(tmp_path / n),
                    "--report", str(tmp_path / f"{n}.json"), home=home) for n in ("a.png", "b.png")]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "seed 1" in run.stdout and "it/s" in run.stdout
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    request = read_png_infotext(tmp_path / "a.png").to_request()
    assert (request.prompt, request.seed, request.steps) == ("a cat", 1, 3)
    report = json.loads((tmp_path / "a.png.json").read_text())
    assert {"phases", "memory", "request"} <= report.keys()
    assert report["phases"]["model_load"] > 0 and report["request"]["seed"] == 1


def test_jobs_file_runs_every_line_in_one_warm_session(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "one", "seed": 1, "steps": 2},
             {"prompt": "two <lora:demo-peft-cool:0.5>", "seed": 2, "steps": 3, "cfg": 3,
              "loras": [["demo-kohya-warm", 0.8]]},
             {"prompt": "three", "seed": 3, "steps": 2, "width": 128, "height": 192}]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = _launch("generate", "--jobs", str(jobs), "--out-dir", str(tmp_path / "out"), home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["0001.json", "0001.png", "0002.json", "0002.png",
                                                     "0003.json", "0003.png"]
    reports = [json.loads((out / f"{i:04d}.json").read_text()) for i in (1, 2, 3)]
    loads = ["model_load" in r["phases"] for r in reports]
    assert loads == [True, False, False]  # one model load, then warm reuse
    assert [r["request"]["prompt"] for r in reports] == ["one", "two", "three"]
    assert Image.open(out / "0003.png").size == (128, 192)
    assert [row["name"] for row in reports[1]["lora"]["stack"]] == ["demo-kohya-warm", "demo-peft-cool"]
    assert read_png_infotext(out / "0002.png").params["Lora hashes"] == (
        f"demo-kohya-warm: {DEMO_SHORT_HASHES['demo-kohya-warm']}, demo-peft-cool: {DEMO_SHORT_HASHES['demo-peft-cool']}")
    assert reports[2]["lora"]["unpatch"]["method"] == "restore_in_place"  # job 3 has no LoRA: taken off


def test_lora_flags_apply_a_stack(tmp_path):
    run = _launch("generate", "--prompt", "a cat", "--seed", "4", "--steps", "2", "--lora", "demo-kohya-warm:0.7",
                  "--lora", "demo-locon-grain", "--out", str(tmp_path / "l.png"), "--report", str(tmp_path / "l.json"),
                  home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    assert "LoRAs demo-kohya-warm:0.7 (miss), demo-locon-grain:1 (miss)" in run.stdout
    assert read_png_infotext(tmp_path / "l.png").to_request().loras == (("demo-kohya-warm", 0.7),
                                                                         ("demo-locon-grain", 1.0))
    phases = json.loads((tmp_path / "l.json").read_text())["phases"]
    assert {"lora_load", "lora_patch"} <= phases.keys()


def test_errors_are_one_line_without_traceback(tmp_path):
    home = tmp_path / "home"
    bad_steps = _launch("generate", "--prompt", "x", "--steps", "0", home=home)
    assert bad_steps.returncode == 2
    assert bad_steps.stderr.strip() == "error: `steps` must be between 1 and 200, got 0"
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04K\x01.")
    pickle = _launch("generate", "--prompt", "x", "--model", str(tmp_path / "m.ckpt"), home=home)
    assert pickle.returncode == 2 and "Traceback" not in pickle.stderr
    assert "never loaded" in pickle.stderr and len(pickle.stderr.strip().splitlines()) == 1
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "x", "steps": -1}\n')
    bad_job = _launch("generate", "--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "o"),
                      home=home)
    assert bad_job.returncode == 2 and "jobs.jsonl line 2: `steps` must be between 1 and 200" in bad_job.stderr
    assert not (tmp_path / "o").exists()  # every line is checked before any work


def test_help_documents_every_command():
    run = subprocess.run([sys.executable, str(ROOT / "launch.py"), "generate", "--help"], capture_output=True,
                         text=True, timeout=120)
    for flag in ("--prompt", "--negative", "--seed", "--steps", "--cfg", "--width", "--height", "--model", "--out",
                 "--report", "--jobs", "--out-dir"):
        assert flag in run.stdout


def test_bake_writes_a_model_that_generates_what_the_stack_generates(tmp_path):
    home = tmp_path / "home"
    baked = tmp_path / "baked"
    run = _launch("bake", "--lora", "demo-kohya-warm:0.8", "--lora", "demo-peft-cool:0.5", "--out", str(baked),
                  "--single-file", str(tmp_path / "baked.safetensors"), home=home)
    assert run.returncode == 0, run.stderr
    assert (baked / "model_index.json").exists() and (tmp_path / "baked.safetensors").exists()
    common = ["--prompt", "a cat", "--seed", "9", "--steps", "2", "--width", "64", "--height", "64"]
    with_loras = _launch("generate", *common, "--lora", "demo-kohya-warm:0.8", "--lora", "demo-peft-cool:0.5",
                         "--out", str(tmp_path / "stack.png"), home=home)
    from_folder = _launch("generate", *common, "--model", str(baked), "--out", str(tmp_path / "folder.png"),
                          home=home)
    from_file = _launch("generate", *common, "--model", str(tmp_path / "baked.safetensors"),
                        "--out", str(tmp_path / "file.png"), home=home)
    for done in (with_loras, from_folder, from_file):
        assert done.returncode == 0, done.stderr
    stack, folder, single = (np.asarray(Image.open(tmp_path / n)) for n in ("stack.png", "folder.png", "file.png"))
    assert np.array_equal(stack, folder) and np.array_equal(stack, single)
    again = _launch("bake", "--lora", "demo-kohya-warm", "--out", str(baked), home=home)
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_lora_flags_take_the_tag_arguments():
    from studio.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "p", "--lora", "demo-kohya-warm:1:lbw=INS",
                                      "--lora", "demo-peft-cool:0.8:0.4", "--lora", "/tmp/a:b.safetensors:0.5",
                                      "--lora", "demo-locon-grain"])
    assert args.lora == [("demo-kohya-warm", 1.0, "lbw=INS"), ("demo-peft-cool", 0.8, "unet=0.4"),
                         ("/tmp/a:b.safetensors", 0.5), ("demo-locon-grain", 1.0)]


def test_a_bad_lora_flag_is_one_line(tmp_path):
    run = _launch("generate", "--prompt", "p", "--lora", "demo-kohya-warm:nan", home=tmp_path / "home")
    assert run.returncode == 2 and "demo-kohya-warm" in run.stderr and "Traceback" not in run.stderr


def test_grid_command_writes_cells_grid_and_json(tmp_path):
    out = tmp_path / "grid"
    run = _launch("grid", "--prompt", "a cat", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64",
                  "--x", "lora:demo-kohya-warm=0,0.5,1", "--y", "lora:demo-peft-cool=0,0.7", "--out-dir", str(out),
                  home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    assert "cell 6/6" in run.stdout and "measured" in run.stdout and "estimate" in run.stdout
    data = json.loads((out / "grid.json").read_text())
    assert len(data["cells"]) == 6 and (out / "grid.png").exists()
    for cell in data["cells"]:
        assert read_png_infotext(out / cell["file"]).to_request().loras == tuple(map(tuple, cell["request"]["loras"]))
    bad = _launch("grid", "--prompt", "a cat", "--x", "lbw:demo-kohya-warm=ALL,NOPE", "--out-dir", str(out / "b"),
                  home=tmp_path / "home")
    assert bad.returncode == 2 and "unknown block-weight preset" in bad.stderr and not (out / "b").exists()


def test_job_lines_take_lora_options(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "one", "seed": 1, "steps": 2, "width": 64, "height": 64,
                                "loras": [["demo-kohya-warm", 0.8, "lbw=OUTD:stop=1"]]}) + "\n")
    run = _launch("generate", "--jobs", str(jobs), "--out-dir", str(tmp_path / "out"), home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    info = read_png_infotext(tmp_path / "out" / "0001.png")
    assert "<lora:demo-kohya-warm:0.8:lbw=OUTD:stop=1>" in info.prompt
    report = json.loads((tmp_path / "out" / "0001.json").read_text())
    assert report["lora"]["step_switches"][0]["step"] == 1
def _run_in_process(argv: list[str], home: Path, monkeypatch) -> int:
    """The CLI's own entry (no subprocess, no model load for input errors), as `launch.py` calls it."""
    from studio.cli import build_parser, run

    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    return run(build_parser().parse_args(argv))


def test_a_jobs_file_reports_every_bad_line_at_once(tmp_path, monkeypatch, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "ok"}\n{"prompt": "x", "steps": 0}\nnot json\n\n{"prompt": "y", "width": 4096}\n'
                    '{"prompt": "z <lora:no-such-lora:1>"}\n')
    code = _run_in_process(["generate", "--jobs", str(jobs), "--out-dir", str(tmp_path / "o")], tmp_path / "h",
                           monkeypatch)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines[0] == "error: 4 bad lines; nothing was run:"
    assert lines[1] == "jobs.jsonl line 2: `steps` must be between 1 and 200, got 0"
    assert lines[2].startswith("jobs.jsonl line 3: not JSON")
    assert lines[3] == "jobs.jsonl line 5: `width` must be a multiple of 8 between 64 and 2048, got 4096"
    assert lines[4].startswith("jobs.jsonl line 6:") and "no-such-lora" in lines[4]
    assert not (tmp_path / "o").exists()


def test_jobs_without_an_out_dir_is_bad_input_and_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "ok"}\n')
    assert _run_in_process(["generate", "--jobs", str(tmp_path / "jobs.jsonl")], tmp_path / "h", monkeypatch) == 2
    assert "--jobs needs --out-dir DIR" in capsys.readouterr().err
    assert _run_in_process(["generate"], tmp_path / "h", monkeypatch) == 2  # no --prompt: bad input too


def test_bad_grid_input_exits_2_before_any_model_load(tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    assert _run_in_process(["grid", "--prompt", "p", "--out-dir", str(out)], tmp_path / "h", monkeypatch) == 2
    assert "grid needs at least one axis" in capsys.readouterr().err
    assert _run_in_process(["grid", "--prompt", "p", "--x", "colour=1,2", "--out-dir", str(out)], tmp_path / "h",
                           monkeypatch) == 2
    assert "KIND=v1,v2" in capsys.readouterr().err
    assert _run_in_process(["grid", "--x", "seed=1,2", "--out-dir", str(out)], tmp_path / "h", monkeypatch) == 2
    assert "grid needs --prompt TEXT" in capsys.readouterr().err and not out.exists()
