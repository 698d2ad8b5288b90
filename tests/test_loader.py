from __future__ import annotations

import pickle

import pytest

from studio.errors import ModelLoadError
from studio.models.loader import SourceKind, resolve_source
from studio.paths import TINY_MODEL_DIR


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"would": "run code"}))
    with pytest.raises(ModelLoadError, match="never loaded, because unpickling can run arbitrary code"):
        resolve_source(str(path))


def test_sources_resolve_by_kind(tmp_path):
    assert resolve_source(None).kind is SourceKind.EMBEDDED
    assert resolve_source("").path == TINY_MODEL_DIR
    assert resolve_source(str(TINY_MODEL_DIR)).kind is SourceKind.FOLDER
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.safetensors")).kind is SourceKind.SINGLE_FILE
    assert resolve_source("stabilityai/stable-diffusion-xl-base-1.0").kind is SourceKind.HUB


def test_unloadable_paths_say_why(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        resolve_source(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported model file"):
        resolve_source(str(tmp_path / "x.gguf"))
