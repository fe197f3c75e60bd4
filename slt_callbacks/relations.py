"""Moved to :mod:`slt_callbacks.analysis.relations`; this path re-exports it."""

from .analysis.relations import *  # noqa: F403
from .analysis.relations import __all__  # noqa: F401
