"""The tree shows the architecture (docs/architecture.md): imports only go down the layers, no
module imports itself back through others, and no source file outgrows one reading.

Every import counts, also those inside functions: a deferred import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("encoders", "projectors", "omni")
MAX_LINES = 500

# lowest first; a module may import its own layer's modules and any lower layer's
LAYERS = [
    ("encoders", "projectors"),
    ("omni.errors", "omni.modalities", "omni.config", "omni.files", "omni.distributed", "omni.tiny_world",
     "omni.tokenizer",
     "omni.presets"),
    ("omni.speech",),
    ("omni.hf",),
    ("omni.model",),
    ("omni.data",),
    ("omni.curate",),
    ("omni.align",),
    ("omni.train",),
    ("omni.inference", "omni.eval", "omni.speech_eval", "omni.speech_guard", "omni.schedule", "omni.plan"),
    ("omni.export", "omni.demo", "omni.integrations"),
    ("omni.cli",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `path` imports (the longest known module name of each import)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_imports_only_go_down_the_layers():
    known = _modules()
    wrong = []
    for module, path in known.items():
        for dep in _imports(path, known) - {module}:
            if _layer(dep) > _layer(module):
                wrong.append(f"{module} imports {dep} (layer {_layer(dep)} above {_layer(module)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = _modules()
    graph = {m: _imports(p, known) - {m} for m, p in known.items()}
    # a package's __init__ is reached by importing anything inside it: it must not import back in
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_source_file_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, long
