"""The package's folders are its layers: every import points down (or stays in its folder), none runs in a
circle, and the protocol floor imports no torch, web framework, Azure or MLflow. Read on the import graph
of the source, so it holds for imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mixtral_endpoint"
# Lowest first: a module may import its own folder and the folders below it, never one above.
LAYERS = ["protocol", "model", "engines", "serving", "doors", "cli"]
HEAVY = ("torch", "transformers", "vllm", "flask", "mlflow", "azureml", "azure", "xgrammar")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module the file imports, absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layers read plainer absolute)"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_module_sits_in_a_layer_folder() -> None:
    for module in _graph():
        if module != "mixtral_endpoint":
            assert module.split(".")[1] in LAYERS, f"{module} is in no layer folder"


def test_every_import_points_down_or_stays_in_its_folder() -> None:
    for module, imported in _graph().items():
        for other in imported:
            if module != "mixtral_endpoint" and other.count(".") > 1:
                assert _layer(other) <= _layer(module), f"{module} imports {other}, a layer above it"


def test_no_import_runs_in_a_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "circle: " + " -> ".join((*path, module))
        if module not in done:
            for other in graph[module]:
                visit(other, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_the_protocol_floor_imports_no_engine_web_azure_or_mlflow() -> None:
    for path in (PACKAGE / "protocol").glob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
