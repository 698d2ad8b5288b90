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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of ours, wherever it sits:
    inside functions and `if TYPE_CHECKING:` blocks too."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from studio.lora import cache`: the module itself
                    found.append((sub, []))
                elif base in modules:
                    found.append((base, [alias.name]))
    return found


def _our_modules() -> dict[str, Path]:
    return {_module_name(p): p for top in ("studio", "ui") for p in (ROOT / top).rglob("*.py")}


def test_no_import_cycles_in_studio_and_ui():
    modules = _our_modules()
    graph = {name: {dep for dep, _ in _internal_imports(path, set(modules)) if dep != name and
                    not name.startswith(dep + ".")}  # a package's own __init__ is not a cycle
             for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    modules = _our_modules()
    offenders = sorted(f"{name} imports {dep}.{n}" for name, path in modules.items()
                       for dep, names in _internal_imports(path, set(modules)) for n in names
                       if n.startswith("_") and not n.startswith("__"))
    assert offenders == []
