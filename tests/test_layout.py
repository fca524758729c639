"""The package's layout: imports run one way, from the scripts down through the sub-packages, with no cycle; the model
file stays self-contained; no function is longer than a screen."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpt2_repro"
# The sub-packages, lowest first: each may import those before it, never one after it.
LAYERS = ["base", "data", "publishing", "evaluation", "checkpointing", "training"]
SCRIPTS = ["train", "data_prep", "evaluate_gpt2", "sample"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports, anywhere in the file (also inside functions), as absolute names."""
    module, found = _module_name(path), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / f"{s}.py" for s in SCRIPTS), ROOT / "modeling_gpt2_repro.py"]
    modules = {_module_name(p): p for p in files}
    return {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "gpt2_repro" and len(parts) > 2 else None


def test_sub_packages_import_only_those_below_them():
    upward = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if _layer(m) and _layer(d) and LAYERS.index(_layer(d)) > LAYERS.index(_layer(m))
    ]
    assert not upward, upward
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_no_import_cycle_and_scripts_import_no_script():
    graph = _graph()
    on_path, done, cycles = [], set(), []

    def visit(module):
        if module in on_path:
            cycles.append(on_path[on_path.index(module) :] + [module])
            return
        if module in done:
            return
        on_path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, cycles
    assert not [(s, d) for s in SCRIPTS for d in graph[s] if d in SCRIPTS]
    assert not [m for m, deps in graph.items() if m.startswith("gpt2_repro") and set(SCRIPTS) & deps]


def test_the_model_file_imports_only_torch_transformers_and_the_standard_library():
    tops = {name.split(".")[0] for name in _imports(ROOT / "modeling_gpt2_repro.py")}
    assert tops - {"torch", "transformers", "__future__"} <= set(sys.stdlib_module_names), tops


def test_no_function_is_longer_than_a_screen():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / f"{s}.py" for s in SCRIPTS), ROOT / "modeling_gpt2_repro.py"]
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_an_installed_package_holds_every_sub_package_and_the_metric_script():
    """`pip install .` (not only the editable install of a clone) gets every sub-package and the local metric."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from setuptools import find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(find_packages(str(ROOT), include=tool["packages"]["find"]["include"]))
    assert packages == {"gpt2_repro", *(f"gpt2_repro.{layer}" for layer in LAYERS)}
    (patterns,) = tool["package-data"]["gpt2_repro.evaluation"]
    assert list((PACKAGE / "evaluation").glob(patterns)), patterns
