"""Hugging Face ``transformers``: imported lazily, only when a model is built from it (extra ``curvdist[hf]``).

``import curvdist`` never imports ``transformers``. On some machines the installed ``torchvision`` does not match
``torch`` (a CUDA build next to a CPU torch): its import fails while registering fake kernels for its C++ ops
("operator torchvision::nms does not exist"), and ``transformers`` imports ``torchvision`` whenever Pillow is
installed. :func:`import_transformers` then imports ``torchvision`` once with those registrations skipped — only
its pure-Python parts are used by ``transformers`` — and leaves ``torch.library`` as it was. A working
``torchvision`` is imported as is.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import DependencyError

EXTRA = "pip install 'curvdist[hf]' (or pip install transformers)"


def _import_torchvision_without_kernels() -> None:
    """Import torchvision; if its fake-kernel registration fails because its C++ ops are missing, import it again
    with the registrations of ``torchvision::`` ops skipped (the ops stay unusable; nothing here calls them)."""
    import importlib.util

    import torch

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake

    def skip_torchvision(op: Any, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn: fn
        return register_fake(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision  # type: ignore[assignment]
    try:
        importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = register_fake


def import_transformers() -> ModuleType:
    """The ``transformers`` module, or a :class:`~curvdist.errors.DependencyError` naming the extra."""
    if importlib.util.find_spec("transformers") is None:
        raise DependencyError(f"Hugging Face models need the transformers package: {EXTRA}")
    _import_torchvision_without_kernels()
    return importlib.import_module("transformers")


def import_timm() -> ModuleType:
    """The ``timm`` module (vision transformers), or a :class:`~curvdist.errors.DependencyError`."""
    if importlib.util.find_spec("timm") is None:
        raise DependencyError("timm models need the timm package: pip install timm")
    _import_torchvision_without_kernels()
    return importlib.import_module("timm")
