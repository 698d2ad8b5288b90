"""Layers point one way: studio/ never imports gradio or ui (DESIGN.md §1)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("gradio", "ui")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_never_imports_the_front_end():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & set(FORBIDDEN))
                 for p in (ROOT / "studio").rglob("*.py") if _imports(p) & set(FORBIDDEN)}
    assert offenders == {}


def test_importing_the_engine_pulls_in_no_gradio_and_touches_no_files(tmp_path):
    import os
    import subprocess
    import sys

    code = "import sys, studio.session, studio.cli; print('gradio' in sys.modules)"
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, env=env)
    assert out.stdout.split() == ["False"]
    assert not (tmp_path / "home").exists()  # nothing happens at import: no folders, no settings, no model
