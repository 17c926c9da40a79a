"""The package's layers, read from its source: every import (function-local ones too) goes to the
same layer or a lower one, no two modules import each other in a ring, no method is named outside
methods/, and the light entry points (``import tuneforge``, ``tuneforge --help``, ``tuneforge
config``) load neither torch nor transformers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tuneforge"

# Lowest first, as docs/architecture.md draws them. A module belongs to the layer of the longest
# prefix that names it; a package's own __init__ counts as the module of its name.
LAYERS = [
    ("core", ["tuneforge.core"]),
    ("model parts", ["tuneforge.model", "tuneforge.quant"]),
    ("data", ["tuneforge.data"]),
    ("methods", ["tuneforge.methods"]),
    ("io", ["tuneforge.io"]),
    ("eval", ["tuneforge.eval"]),
    ("training", ["tuneforge.training"]),
    ("apps", ["tuneforge.apps"]),
    ("entry points", ["tuneforge.cli", "tuneforge.__main__", "tuneforge"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module``; the bare package name matches only itself."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or (prefix != "tuneforge" and module.startswith(prefix + "."))), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[1]


def imports(module: str) -> set[str]:
    """The tuneforge modules ``module`` imports, anywhere in its file; ``from a import b`` counts as a
    import of a.b when a.b is a module. Importing a.b.c also runs a and a.b."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}:{node.lineno}: a relative import; write the full module path"
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name in MODULES:
                parts = name.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # A module's own packages run before it and are part of it, not something it depends on.
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return {m for m in found - own if m in MODULES}


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One ring of imports, if there is one (a depth-first search for an edge back onto the path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                ring = path + [m, d]
                return ring[ring.index(d):]
            if d not in state and (ring := visit(d, path + [m])):
                return ring
        state[m] = 2
        return None

    return next((ring for m in sorted(graph) if m not in state and (ring := visit(m, []))), None)


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_goes_to_the_same_layer_or_below():
    assert not upward(GRAPH), "\n".join(upward(GRAPH))


def test_the_top_level_holds_only_the_entry_points():
    """Everything else sits in the folder of its layer, so the tree shows the layers."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders == {prefix.split(".")[1] for _, prefixes in LAYERS[:-1] for prefix in prefixes}


def test_no_import_cycles():
    assert cycle(GRAPH) is None, "import cycle: " + " -> ".join(cycle(GRAPH) or [])


def test_the_checks_see_a_violation():
    assert layer_of("tuneforge.data.readers") < layer_of("tuneforge.methods.lora") < layer_of("tuneforge.cli")
    assert "tuneforge.methods._shared" in GRAPH["tuneforge.methods.lora"]
    assert "tuneforge.eval.evaluator" in GRAPH["tuneforge.training.loop"]
    assert "tuneforge.training.run" in GRAPH["tuneforge.cli"]  # a function-local import counts too
    bad = {"tuneforge.methods.lora": {"tuneforge.io.load"}, "tuneforge.io.load": {"tuneforge.methods.lora"}}
    assert upward(bad) == ["tuneforge.methods.lora (methods) imports tuneforge.io.load (io)"]
    assert cycle(bad) == ["tuneforge.io.load", "tuneforge.methods.lora", "tuneforge.io.load"]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("tuneforge.newpackage.module")


METHOD_NAMES = ("full", "lora", "qlora", "adapter", "ia3", "vera", "prefix", "prompt", "features")


def named_methods(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each method name a comparison, a subscript, a dict key or a call's argument holds:
    a branch on a method's name, or a look-up of one."""
    spots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            parts = [node.slice]
        elif isinstance(node, ast.Dict):
            parts = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Call):
            parts = [*node.args, *(k.value for k in node.keywords)]
        else:
            continue
        for part in parts:
            for leaf in ast.walk(part):
                if isinstance(leaf, ast.Constant) and leaf.value in METHOD_NAMES:
                    spots.append((leaf.lineno, leaf.value))
    return spots


def test_no_method_is_named_outside_methods():
    """Outside methods/ (and the configs' table of names) a method is reached through the registry (by the name a config or an adapter
    file gives) or through its handle, never by a name written in the code."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r}" for module, path in MODULES.items()
             if not module.startswith(("tuneforge.methods", "tuneforge.core.config.methods")) for line, name in named_methods(ast.parse(path.read_text()))]
    assert not found, "\n".join(found)
    assert named_methods(ast.parse('if cfg.method.name == "features": pass')) == [(1, "features")]
    assert not re.search(r"tuneforge_method\b", "".join(p.read_text() for p in MODULES.values()))


def loaded_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    return set(out.stdout.split())


@pytest.mark.parametrize("code", [
    "import tuneforge",
    "from tuneforge import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass",
    "from tuneforge import cli\ncli.main(['config', 'configs/demo-lora.yaml'])",
], ids=["import", "help", "config"])
def test_light_entry_points_load_no_torch(code):
    heavy = loaded_modules(code) & {"torch", "transformers", "numpy"}
    assert not heavy, f"{code!r} imported {sorted(heavy)}"


def test_the_api_loads_on_first_use():
    assert "torch" in loaded_modules("import tuneforge\ntuneforge.load_model")
