"""Import direction: rpc ⇏ torch/explain, runtime.batcher ⇏ torch, explain ⇏ grpc,
models ⇏ data, SDK ⇏ torch/vitlens_server.

Checked twice: statically, on the transitive closure of every import statement in the source
(function-level imports included, and a module's parent packages, whose ``__init__`` runs
first); and by importing the modules in a fresh interpreter and looking at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "vitlens": ROOT / "client" / "vitlens",
    "vitlens_server": ROOT / "server" / "vitlens_server",
}

# (modules under this prefix, must never reach an import of this name or under it)
RULES = [
    ("vitlens_server.rpc", "torch"),
    ("vitlens_server.rpc", "vitlens_server.explain"),
    ("vitlens_server.rpc", "vitlens_server.evaluate"),
    ("vitlens_server.runtime.batcher", "torch"),
    ("vitlens_server.runtime.cache", "torch"),
    ("vitlens_server.runtime.api", "torch"),
    ("vitlens_server.domain", "torch"),
    ("vitlens_server.explain", "grpc"),
    ("vitlens_server.evaluate", "grpc"),
    ("vitlens_server.models", "vitlens_server.data"),
    ("vitlens_server.models", "grpc"),
    ("vitlens", "torch"),
    ("vitlens", "vitlens_server"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def _direct(module: str) -> frozenset[str]:
    """Every module an import statement of ``module`` names, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    return frozenset(names)


def _reach(module: str) -> set[str]:
    """The transitive imports of ``module`` (first-party modules followed, parents included)."""
    seen: set[str] = set()
    todo = [module, *_parents(module)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in MODULES:
            for target in _direct(name):
                todo += [target, *(p for p in _parents(target) if p in MODULES)]
    return seen


def _hits(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize(("prefix", "forbidden"), RULES)
def test_no_module_reaches_a_forbidden_import(prefix: str, forbidden: str) -> None:
    checked = [m for m in MODULES if _hits(m, prefix)]
    assert checked, prefix
    for module in checked:
        bad = sorted(n for n in _reach(module) if _hits(n, forbidden))
        assert not bad, f"{module} reaches {forbidden}: {bad[:5]}"


def test_the_checker_sees_a_violation() -> None:
    assert any(_hits(n, "torch") for n in _reach("vitlens_server.runtime.worker"))
    assert any(_hits(n, "vitlens_server.explain") for n in _reach("vitlens_server.runtime.plane"))


def test_importing_the_torch_free_layers_loads_no_torch() -> None:
    modules = [
        m
        for m in MODULES
        if any(_hits(m, p) for p, f in RULES if f == "torch") and not m.endswith("__main__")
    ]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
