"""Structure targets that keep the code readable (issues #9, #10, #11), checked on the source:
no function in ``core/`` has a body of more than 60 lines (docstring and signature not
counted), and the
two monitors that are adapters stay thin (class body with docstring ≤ 150 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import slt_callbacks

PACKAGE = Path(slt_callbacks.__file__).parent


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body after the docstring (the signature, one line per argument in a
    long public signature, is not the function's logic)."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
            body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1  # type: ignore[operator]


def test_no_function_in_core_has_more_than_60_lines_of_code():
    long = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (n := _code_lines(node)) > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


@pytest.mark.parametrize(("module", "name"), [("callbacks/llc.py", "LLCMonitor"),
                                              ("callbacks/stages.py", "StageTransitionMonitor")])
def test_adapters_are_thin(module, name):
    tree = ast.parse((PACKAGE / module).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert node.end_lineno - node.lineno + 1 <= 150  # type: ignore[operator]
