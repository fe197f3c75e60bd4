"""The package's top level imports lazily: the core needs torch only, the analysis numpy only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import slt_callbacks

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "wandb", "matplotlib", "torchmetrics")


def _modules_after(statement: str) -> list[str]:
    """Top-level packages in sys.modules after ``statement`` in a fresh interpreter."""
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    ["import slt_callbacks.core", "import slt_callbacks.executors", "import slt_callbacks"],
)
def test_import_without_lightning_or_wandb(statement: str) -> None:
    loaded = _modules_after(statement)
    assert "slt_callbacks" in loaded
    assert not [name for name in HEAVY if name in loaded], loaded


def test_analysis_imports_without_torch_or_lightning() -> None:
    if not (ROOT / "slt_callbacks" / "analysis").exists():
        pytest.skip("slt_callbacks.analysis is not in this tree yet")
    loaded = _modules_after("import slt_callbacks.analysis")
    assert not [name for name in (*HEAVY, "torch") if name in loaded], loaded


def test_every_public_name_resolves() -> None:
    for name in slt_callbacks.__all__:
        assert getattr(slt_callbacks, name) is not None, name
    assert set(slt_callbacks.__all__) <= set(dir(slt_callbacks))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        slt_callbacks.not_a_name  # noqa: B018


def test_lazy_name_is_the_defining_object() -> None:
    from slt_callbacks.callbacks import LLCMonitor
    from slt_callbacks.core import estimate_llc

    assert slt_callbacks.LLCMonitor is LLCMonitor
    assert slt_callbacks.estimate_llc is estimate_llc
