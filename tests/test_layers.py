"""The package's stages import one way (docs/ARCHITECTURE.md): a stage uses the ones below it, never one above."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medtune"
# Lowest first. The shared modules at the root import nothing of medtune; the commands at the root sit on top.
LAYERS = [
    {"adapters", "checkpoints", "command_line", "tiny"},
    {"inference"},
    {"data"},
    {"monitoring"},
    {"export"},
    {"eval"},
    {"training", "serve"},
    {"prepare_data"},
]
LEVEL = {stage: i for i, stages in enumerate(LAYERS) for stage in stages}


def stage(module: str) -> str:
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """Every medtune module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medtune."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "medtune":
            found |= {f"medtune.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medtune.")}
    return found


def test_every_module_belongs_to_a_stage():
    assert {p.stem if p.suffix else p.name for p in PACKAGE.iterdir()
            if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())} == set(LEVEL)


def test_imports_run_one_way():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = stage("medtune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for module in imports(path):
            there = stage(module)
            if there != here and LEVEL[there] >= LEVEL[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not upward, "\n".join(sorted(upward))
