"""The package's layers import only downwards: io -> data -> models -> embedding/inference -> evaluation ->
training (-> recipes, outside the package). Every import of hipt_e2e and of the hipt-shards CLI, at module
level or inside a function, is read with `ast`."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("io", "data", "models", "inference", "evaluation", "training")
# the layer of each package or top-level module (the longest matching prefix decides)
HOME = {
    "hipt_e2e": "io", "hipt_e2e.config": "io", "hipt_e2e.errors": "io", "hipt_e2e.io": "io",
    "hipt_e2e.normalise": "io", "hipt_e2e.progress": "io", "hipt_e2e.runtime": "io",
    "hipt_e2e.data": "data", "hipt_e2e.ssl": "data", "shards": "data",
    "hipt_e2e.models": "models", "hipt_e2e.lineage": "models",
    "hipt_e2e.embedding": "inference", "hipt_e2e.inference": "inference",
    "hipt_e2e.evaluation": "evaluation",
    "hipt_e2e.training": "training",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in HOME:
            return LAYERS.index(HOME[".".join(parts[:n])])
    raise AssertionError(f"{module} has no layer: add it to HOME in {Path(__file__).name}")


def imported_modules(path: Path) -> set[str]:
    """The hipt_e2e / shards modules a file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from package import name`: name may be a module of that package
            found.update(f"{base}.{alias.name}" if node.module is None else base for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("hipt_e2e", "shards")}


def test_no_module_imports_a_higher_layer() -> None:
    files = sorted([*REPO.glob("hipt_e2e/**/*.py"), *REPO.glob("shards/**/*.py")])
    assert len(files) > 50
    upward = []
    for path in files:
        own = layer_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        upward += [f"{path.relative_to(REPO)} ({LAYERS[own]}) imports {name} ({LAYERS[layer_of(name)]})"
                   for name in sorted(imported_modules(path)) if layer_of(name) > own]
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)
