"""The outputs folder: which folders may be it, the fallback at start, and files created exclusively."""

from __future__ import annotations

import threading
from datetime import date
from pathlib import Path

import pytest

import studio.outputs as outputs
from studio.errors import SettingsError
from studio.outputs import OutputFolder, check_outputs_dir, choose_outputs

DAY = date(2024, 5, 1)


@pytest.mark.parametrize("pick, why", [
    (lambda dirs: "/", "the filesystem root"),
    (lambda dirs: "~", "your home folder"),
    (lambda dirs: str(Path.home().parent), "holds your home folder"),
    (lambda dirs: str(dirs.config), "the config folder (it holds settings.toml)"),
    (lambda dirs: str(dirs.settings_file.parent.parent), "holds the config folder"),
    (lambda dirs: str(dirs.data), "the app's data folder"),
    (lambda dirs: str(dirs.cache), "the app's cache folder"),
])
def test_folders_that_are_not_an_outputs_folder_of_their_own_are_refused(studio_home, tmp_path, monkeypatch, pick,
                                                                         why):
    """Everything in the outputs folder is served: `outputs_dir = "/"` served /etc/passwd (issue 11)."""
    monkeypatch.setenv("HOME", str(tmp_path / "users" / "me"))
    with pytest.raises(SettingsError, match="is refused: it (is|holds) ") as refused:
        check_outputs_dir(pick(studio_home), studio_home)
    assert why in str(refused.value)


def test_a_lora_folder_and_the_folders_above_it_are_refused(studio_home, tmp_path):
    loras = tmp_path / "pictures" / "loras"
    loras.mkdir(parents=True)
    for value in (loras, loras.parent):
        with pytest.raises(SettingsError, match="a LoRA folder"):
            check_outputs_dir(str(value), studio_home, lora_dirs=[str(loras)])
    assert check_outputs_dir(str(loras.parent / "out"), studio_home, lora_dirs=[str(loras)]) == loras.parent / "out"
    assert check_outputs_dir("", studio_home) == studio_home.default_outputs


@pytest.mark.parametrize("value, why", [("/", "the filesystem root"), ("/proc/x", "cannot be created")])
def test_at_start_a_bad_outputs_dir_falls_back_to_the_default_and_says_so(studio_home, caplog, value, why):
    folder, notice = choose_outputs(value, studio_home)
    assert folder == studio_home.default_outputs and folder.is_dir()
    assert notice.startswith(f"`outputs_dir` {value!r} is not used: ") and why in notice
    assert str(studio_home.default_outputs) in notice and notice in caplog.text


def test_a_name_taken_after_the_folder_was_listed_is_skipped_never_overwritten(tmp_path, monkeypatch):
    """Two processes list the folder, both pick 00001: the second must take the next number (issue 11)."""
    day = tmp_path / DAY.isoformat()
    day.mkdir()
    (day / "00001-5.png").write_bytes(b"the other process's image")
    monkeypatch.setattr(outputs, "_highest_number", lambda folder: 0)  # the listing both made, before either wrote
    path = OutputFolder(tmp_path).save(5, lambda fh: fh.write(b"mine"), today=DAY)
    assert path.name == "00002-5.png" and path.read_bytes() == b"mine"
    assert (day / "00001-5.png").read_bytes() == b"the other process's image"


def test_concurrent_savers_each_get_their_own_file(tmp_path):
    folder, names, errors = OutputFolder(tmp_path), [], []

    def saver(tag: int) -> None:
        try:
            for i in range(15):
                names.append(folder.save(7, lambda fh, text=f"{tag}-{i}".encode(): fh.write(text), today=DAY))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(names)) == 60
    assert len({p.read_bytes() for p in names}) == 60  # nobody's image was written over


def test_a_failed_write_leaves_no_file(tmp_path):
    def broken(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        OutputFolder(tmp_path).save(3, broken, today=DAY)
    assert list((tmp_path / DAY.isoformat()).iterdir()) == []
