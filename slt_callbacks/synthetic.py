"""Moved to :mod:`slt_callbacks.analysis.synthetic`; this path re-exports it."""

from .analysis.synthetic import *  # noqa: F403
from .analysis.synthetic import __all__  # noqa: F401
