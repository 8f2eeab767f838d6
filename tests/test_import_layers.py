"""The package's imports run one way (docs/architecture.md, "Import layers"): the
import-linter contract in pyproject.toml holds, and no module imports itself back
through any chain of imports (a cycle inside one package is caught too)."""

import os
import subprocess
import sys

import grimp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("perspective_jax", "kernels_pallas")


def _lint_imports() -> str:
    return os.path.join(os.path.dirname(sys.executable), "lint-imports")


def test_layer_contract_is_kept():
    out = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("root", ["all"])
def test_no_import_cycle_between_modules(root):
    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in ROOTS}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules
                 and not m.startswith(i + ".")}          # a module's own package __init__
             for m in modules}
    assert _cycles(edges) == []
