"""DeepSpeed is optional: it is imported only when the integration is used, and its absence is a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import DependencyError

INSTALL_HINT = "pip install 'curvdist[deepspeed]'"


def require_deepspeed() -> ModuleType:
    """The ``deepspeed`` module; raises :class:`~curvdist.errors.DependencyError` (an ``ImportError``) saying how
    to install it when it is missing."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as e:
        raise DependencyError(
            f"the DeepSpeed integration needs DeepSpeed, which is not installed ({e}); install it with "
            f"{INSTALL_HINT}"
        ) from None
