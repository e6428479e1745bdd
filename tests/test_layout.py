"""The floors of flux/: every import inside the package goes downward (or stays in its own folder), and
nothing in it imports another folder's module at the same floor. Read from the source with `ast`, so a lazy
import inside a function counts as much as one at the top.

    modules (0) <- weights, runtime (1) <- pipelines (2) <- training (3) <- serve (4) <- cli (5)
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flux"
FLOORS = {"modules": 0, "weights": 1, "runtime": 1, "pipelines": 2, "training": 3, "serve": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def flux_imports(path: Path) -> list[str]:
    """The `flux.*` modules `path` imports, `from flux.x import y` counted as flux.x.y when that is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "flux"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "flux":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.append(candidate if is_module else node.module)
    return found


def floor_of(module: str) -> tuple[str, int] | None:
    """(folder, floor) of a flux module; None for the top (`flux` itself and `flux.__main__`)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    assert parts[1] in FLOORS, f"{module}: flux/{parts[1]} is in no floor; add it to FLOORS in {__file__}"
    return parts[1], FLOORS[parts[1]]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_file_is_in_a_floor():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"files directly in flux/ belong to no floor: {loose}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward(path):
    own = floor_of(module_name(path))
    if own is None:  # the package's front door re-exports from every floor
        return
    wrong = []
    for target in flux_imports(path):
        other = floor_of(target)
        if other is None:
            wrong.append(f"{target} (the package top, which imports everything)")
        elif other[1] > own[1] or (other[1] == own[1] and other[0] != own[0]):
            wrong.append(f"{target} (flux/{other[0]}, floor {other[1]})")
    assert not wrong, f"{module_name(path)} (flux/{own[0]}, floor {own[1]}) imports upward or sideways: {wrong}"


def test_no_import_circle():
    graph = {module_name(p): {t for t in flux_imports(p) if floor_of(t)} for p in SOURCES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a modules file importing the pipeline must be reported."""
    fake = PACKAGE / "modules" / "transformer.py"
    source = tmp_path / "bad.py"
    source.write_text("from flux.pipelines.pipeline import Pipeline\n", encoding="utf-8")
    monkeypatch.setattr(ast, "parse", lambda text, _parse=ast.parse: _parse(source.read_text()))
    with pytest.raises(AssertionError, match="imports upward"):
        test_imports_go_downward(fake)
