"""The package layout's import rules: each package imports only packages below it, with no import circles.

The pipeline's packages, bottom to top (docs/architecture.md): core < kernels < quant < adapters < data <
models < plan < train < infer < restore < experiments < serve < commands < cli. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import restora

ROOT = Path(restora.__file__).parent
ORDER = ["core", "kernels", "quant", "adapters", "data", "models", "plan", "train", "infer", "restore", "experiments",
         "serve", "commands", "cli", "__main__"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The restora modules `name` imports (a `from pkg import sub` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "restora":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "restora")
    return found - {name}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_is_in_the_order():
    packages = {_package(m) for m in _modules()} - {None}
    assert packages <= set(ORDER), f"packages missing from the layout order: {sorted(packages - set(ORDER))}"


def test_packages_import_only_packages_below_them():
    modules = _modules()
    rank = {p: i for i, p in enumerate(ORDER)}
    bad = []
    for name, path in modules.items():
        me = _package(name)
        for dep in _imports(name, path, modules):
            other = _package(dep)
            if me and other and rank[other] > rank[me]:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports from a package above: " + ", ".join(sorted(bad))


def test_kernels_import_nothing_from_the_domain():
    modules = _modules()
    bad = [f"{n} -> {d}" for n, p in modules.items() if _package(n) == "kernels"
           for d in _imports(n, p, modules) if _package(d) not in ("kernels", "core", None)]
    assert not bad, ", ".join(bad)


def test_no_import_circles():
    modules = _modules()
    graph = {n: {d for d in _imports(n, p, modules) if d in modules and d != "restora"} for n, p in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a circle: drop package -> own-submodule edges
    graph = {n: {d for d in ds if not d.startswith(n + ".")} for n, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "restora.__main__"))
def test_every_module_imports(module):
    importlib.import_module(module)
