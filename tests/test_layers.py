"""Imports point down the layers, never round in a cycle, and no module grows past MAX_LINES.

Layers are ARCHITECTURE.md's: a module never imports one above it. No module imports itself
through others, within a layer too (the shared piece goes in a module of its own, below its
users). No module is over MAX_LINES lines (STYLE.md: "Modules under ~400 lines").
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Mapping
from pathlib import Path

import levante

SRC = Path(levante.__file__).parent

# Lowest first. A module takes the layer of its longest listed prefix.
LAYERS: list[tuple[str, ...]] = [
    ("levante.errors", "levante.config", "levante.heap", "levante.kinds"),
    # files, kernels, the model, tokenizers; engine.output is text on a tokenizer
    # (incremental detokenization, stop strings), used by the engine and the tool parsers
    ("levante.tokenizer", "levante.gguf_vocab", "levante.load_config", "levante.model",
     "levante.weights", "levante.quant", "levante.engine.output"),
    ("levante.chat",),  # messages, chat formats, tools, FIM: what a bundle is loaded with
    ("levante.bundle", "levante.plan"),
    ("levante.engine", "levante.structured"),
    ("levante.chat.request", "levante.chat.grammars", "levante.llm"),
    ("levante.server", "levante.eval", "levante.bench", "levante.cost", "levante.finetune",
     "levante.distributed", "levante.quant.export", "levante.quant.export_source"),
    ("levante.cli", "levante.__init__", "levante.__main__"),
]

# Known upward imports, each with its reason: a ratchet (the test fails on any new one, and on
# an entry that no longer happens, so the list only shrinks).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

MAX_LINES = 400
# Modules known to be longer, each with its reason: a ratchet too.
KNOWN_LONG: dict[str, str] = {}


def module_name(path: Path) -> str:
    """`levante.chat.tools` for levante/chat/tools.py; a package is named as its folder."""
    return ".".join(("levante", *path.relative_to(SRC).with_suffix("").parts)
                    ).removesuffix(".__init__")


def layer_of(module: str) -> int:
    """The layer of `module` (its longest matching prefix in LAYERS)."""
    module = "levante.__init__" if module == "levante" else module
    best, depth = -1, -1
    for layer, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and prefix.count(".") > depth:
                best, depth = layer, prefix.count(".")
    assert best >= 0, f"{module} is in no layer: add it to LAYERS (and ARCHITECTURE.md)"
    return best


def runtime_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(module, line) of every levante import, lazy ones included, except those under
    `if TYPE_CHECKING:` (annotations only)."""
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
               for stmt in block.body for node in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("levante"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(name if _is_module(name) else str(node.module), node.lineno)
                      for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("levante")]
    return found


def _is_module(dotted: str) -> bool:
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward, known = [], set()
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        for target, line in runtime_imports(ast.parse(path.read_text())):
            if layer_of(target) <= layer_of(module):
                continue
            if (module, target) in KNOWN_UPWARD:
                known.add((module, target))
            else:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)
    assert known == set(KNOWN_UPWARD), f"no longer upward, drop: {set(KNOWN_UPWARD) - known}"


def test_the_check_sees_an_upward_import() -> None:
    tree = ast.parse("from levante.server.config import ServerConfig\n"
                     "if TYPE_CHECKING:\n    from levante.cli import app\n")
    (target, _), = runtime_imports(tree)
    assert layer_of(target) > layer_of("levante.engine.engine")


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {each levante module it imports at run time: the line of the first import}."""
    graph: dict[str, dict[str, int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        edges = graph.setdefault(module, {})
        for target, line in runtime_imports(ast.parse(path.read_text())):
            if target != module:
                edges.setdefault(target, line)
    return graph


def find_cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Import cycles as [a, b, ..., a], at least one wherever modules import each other.

    Depth first: an import of a module still on the current path closes a cycle.
    """
    path: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        path.append(module)
        for target in sorted(graph.get(module, {})):
            if target in path:
                cycles.append([*path[path.index(target):], target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return cycles


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [" -> ".join([*(f"{a}:{graph[a][b]}" for a, b in itertools.pairwise(cycle)),
                           cycle[-1]]) for cycle in find_cycles(graph)]  # module:line of import
    assert not cycles, ("import cycles (move what the modules share into one below them):\n"
                        + "\n".join(cycles))


def test_the_check_sees_a_cycle_through_a_lazy_import() -> None:
    def edges(source: str) -> dict[str, int]:
        return dict(runtime_imports(ast.parse(source)))

    lazy = "def f() -> None:\n    from levante.server.routes import ServerState\n"
    annotation_only = "if TYPE_CHECKING:\n    from levante.server.routes import ServerState\n"
    top = "from levante.server.app import create_app\n"
    assert find_cycles({"levante.server.routes": edges(top), "levante.server.app": edges(lazy)}
                       ) == [["levante.server.app", "levante.server.routes", "levante.server.app"]]
    assert find_cycles({"levante.server.routes": edges(top),
                        "levante.server.app": edges(annotation_only)}) == []


def test_no_module_is_over_max_lines() -> None:
    long, known = [], set()
    for path in sorted(SRC.rglob("*.py")):
        num_lines = len(path.read_text().splitlines())
        if num_lines <= MAX_LINES:
            continue
        if module_name(path) in KNOWN_LONG:
            known.add(module_name(path))
        else:
            long.append(f"{path.relative_to(SRC)}: {num_lines} lines")
    assert not long, (f"modules over {MAX_LINES} lines (split each along a seam):\n"
                      + "\n".join(long))
    assert known == set(KNOWN_LONG), f"no longer over {MAX_LINES} lines, drop: " \
        f"{set(KNOWN_LONG) - known}"
