"""Shared fixtures: an isolated app home per test, and one warm tiny-model session per run."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub, in tests least of all
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from studio.choices import Precision  # noqa: E402
from studio.paths import AppDirs  # noqa: E402
from studio.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    2 shared cores: OpenMP threads spinning against other processes made a 2 ms apply take
    270 ms (measured), so the patcher tests run single-threaded.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def studio_home(tmp_path, monkeypatch):
    """LORA_STUDIO_HOME pointed at a fresh folder; returns the resolved AppDirs."""
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    from studio.paths import app_dirs

    return app_dirs()


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory) -> AppDirs:
    root = tmp_path_factory.mktemp("session-home")
    dirs = AppDirs(config=root / "config", data=root / "data", cache=root / "cache")
    for folder in (dirs.config, dirs.data, dirs.cache):
        folder.mkdir(parents=True)
    return dirs


@pytest.fixture(scope="session")
def tiny_session(session_dirs):
    """One warm session on the embedded model, shared by the tests that only generate.

    Precision auto, as users run it: bf16 where this CPU has native bf16, else fp32 (a bf16 test
    session on an AVX2-only CPU ran generations ~7x slower and timed the browser test out, issue 9).
    """
    from studio.session import Session

    session = Session(Settings(device="cpu", precision=Precision.AUTO), session_dirs)
    session.load_model()
    yield session
    session.close()
