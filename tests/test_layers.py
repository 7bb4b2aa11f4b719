"""Imports point down the layers of ARCHITECTURE.md: a module never imports one above it."""

from __future__ import annotations

import ast
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


def layer_of(module: str) -> int:
    """The layer of `module` (its longest matching prefix in LAYERS)."""
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
        module = ".".join(("levante", *path.relative_to(SRC).with_suffix("").parts))
        if module != "levante.__init__":
            module = module.removesuffix(".__init__")
        for target, line in runtime_imports(ast.parse(path.read_text())):
            if layer_of(target if target != "levante" else "levante.__init__") <= layer_of(module):
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
