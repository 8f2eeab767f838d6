"""tools/ holds benchmarks that import the installed package: none of them edits
sys.path (a tool's own directory is on it already when run as a script, which is
how a tool reaches its sibling helpers, benchlib and streaming_models)."""

import ast
import pathlib

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"
SCRIPTS = sorted(TOOLS.glob("*.py"))


def _is_sys_path(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def sys_path_edits(source: str) -> list[int]:
    """Line numbers of every call of a sys.path method (insert, append, extend, …),
    assignment to sys.path or its items, and `site.addsitedir` call."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if _is_sys_path(owner) or node.func.attr == "addsitedir":
                lines.append(node.lineno)
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_checker_sees_every_form():
    src = ("import sys, os, site\nsys.path.insert(0, os.getcwd())\nsys.path.append('x')\n"
           "sys.path = ['y'] + sys.path\nsys.path[:0] = ['z']\nsys.path += ['w']\n"
           "site.addsitedir('v')\nprint(sys.path[0])\nx = [1]\nx.insert(0, 2)\n")
    assert sys_path_edits(src) == [2, 3, 4, 5, 6, 7]


def test_there_are_tools():
    assert {"gpu_checks.py", "benchlib.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_tool_does_not_edit_sys_path(script):
    assert sys_path_edits(script.read_text(encoding="utf-8")) == [], \
        f"{script.name} edits sys.path; the package is installed, import it directly"
