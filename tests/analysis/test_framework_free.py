"""slt_callbacks.analysis is numpy only: no torch, Lightning or W&B."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import slt_callbacks.analysis as analysis

FORBIDDEN = ("torch", "lightning", "pytorch_lightning", "wandb")
PACKAGE = Path(analysis.__file__).parent


def test_no_module_of_the_package_imports_a_framework():
    """Every import statement of every module, checked statically (relative imports may only
    reach analysis itself, _checks and records, which are plain Python)."""
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level >= 2:
                    assert node.module in ("_checks", "records"), (path.name, node.module)
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, (path.name, name)


def test_importing_analysis_loads_no_framework():
    code = (
        "import sys, slt_callbacks.analysis, slt_callbacks.analysis.tracker; "
        f"print([m for m in {FORBIDDEN!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parents[1])
    assert out.stdout.strip() == "[]"
