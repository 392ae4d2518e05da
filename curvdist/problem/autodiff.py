"""Make a model's forward pass differentiable by every torch.func transform.

PyTorch's fused attention kernels (flash/efficient SDPA on CPU, the native MultiheadAttention "fast path") have
no forward-mode derivative, so Hessian-vector and Jacobian-vector products through them fail. Inside
:func:`differentiable_kernels` attention runs on the composite "math" kernels, which support every transform.
The fast-path flag is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
