"""tools/install_torch.py, the Makefile's torch step: which build, and when nothing is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("install_torch", ROOT / "tools" / "install_torch.py")
it = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(it)


def test_a_torch_that_fits_is_kept():
    assert it.fits(("2.13.0+cpu", False), "cpu", explicit=False)
    assert it.fits(("2.13.0", True), "cpu", explicit=False)  # a CUDA build runs on the CPU too: no reinstall
    assert not it.fits(("2.13.0", True), "cpu", explicit=True)  # TORCH=cpu asks for the CPU build
    assert it.fits(("2.14.1+cu126", True), "cuda", explicit=True)
    assert not it.fits(("2.13.0+cpu", False), "cuda", explicit=False)
    assert not it.fits(("2.3.1+cpu", False), "cpu", explicit=False)  # older than pyproject's torch>=2.4
    assert not it.fits(None, "cpu", explicit=False)


def test_the_cpu_builds_a_default_index_offers_newest_first():
    versions = ["2.15.0", "2.14.1", "2.13.0+cpu", "2.13.0", "2.10.0+cpu", "2.3.1+cpu"]
    assert it.cpu_builds(versions) == ["2.13.0+cpu", "2.10.0+cpu"]
    assert it.cpu_builds(["2.14.1"]) == []


@pytest.fixture
def fake(monkeypatch):
    """Record pip commands instead of running them; the machine's torch and network are set per test."""
    state = {"found": None, "gpu": False, "reachable": False, "versions": [], "pip": [], "after": ("2.13.0+cpu", False)}

    def pip(_python, *args):
        state["pip"].append(list(args))
        if args[0] == "install":
            state["found"] = state["after"]
        return True

    monkeypatch.setattr(it, "installed_torch", lambda _python: state["found"])
    monkeypatch.setattr(it, "has_nvidia_gpu", lambda: state["gpu"])
    monkeypatch.setattr(it, "reachable", lambda _url: state["reachable"])
    monkeypatch.setattr(it, "index_versions", lambda _python: state["versions"])
    monkeypatch.setattr(it, "pip", pip)
    monkeypatch.delenv("TORCH", raising=False)
    return state


def test_no_gpu_installs_from_the_cpu_index(fake):
    fake["reachable"] = True
    assert it.main([]) == 0
    assert fake["pip"] == [["install", "--index-url", it.CPU_INDEX, "torch>=2.4"]]


def test_an_unreachable_cpu_index_falls_back_to_a_cpu_build_of_the_default_index(fake):
    fake["versions"] = ["2.14.1", "2.13.0+cpu", "2.13.0"]
    assert it.main([]) == 0
    assert fake["pip"] == [["install", "torch==2.13.0+cpu"]]


def test_without_any_cpu_build_it_falls_back_to_the_default_torch(fake, capsys):
    fake["versions"] = ["2.14.1"]
    assert it.main([]) == 0
    assert fake["pip"] == [["install", "torch>=2.4"]] and "CUDA build" in capsys.readouterr().out


def test_a_preinstalled_cpu_torch_installs_nothing_as_in_ci(fake, capsys):
    fake["found"], fake["gpu"] = ("2.13.0+cpu", False), True  # even with a driver: TORCH=cpu keeps it
    assert it.main(["--torch", "cpu"]) == 0
    assert fake["pip"] == [] and "installing no torch" in capsys.readouterr().out


def test_a_gpu_gets_the_cuda_build_and_torch_cuda_forces_it(fake):
    fake["gpu"], fake["after"] = True, ("2.14.1", True)
    assert it.main([]) == 0 and fake["pip"] == [["install", "torch>=2.4"]]
    fake["pip"].clear()
    fake["gpu"], fake["found"] = False, ("2.13.0+cpu", False)
    assert it.main(["--torch", "cuda"]) == 0
    assert fake["pip"] == [["uninstall", "-y", "torch"], ["install", "torch>=2.4"]]


def test_the_makefile_runs_it_before_the_package_and_ci_forces_the_cpu_build():
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/install_torch.py --torch $(TORCH)" in makefile and "TORCH ?= auto" in makefile
    assert "make test TORCH=cpu" in (ROOT / ".ci" / "run").read_text()
