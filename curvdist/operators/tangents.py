"""Tangents that forward-mode AD takes without copying them.

A dual tensor's tangent must have its primal's layout, and torch's forward AD counts the storage in that layout: the
storage's size and the tensor's offset into it as well as sizes and strides. A tangent that does not match is copied
into new memory laid out like the primal. A parameter's tangent cut from a flat vector (``flat[a:a + k].view(shape)``)
never matches a parameter with its own storage, so a ``torch.func.jvp`` over a model's parameters with tangents
taken from one flat vector copies the whole vector. On a pipeline stage of GPT-2 large in 4 stages that is 0.8 GB
more at the peak of every product.

:func:`exact_alias` gives a view the storage bounds of its own: an alias of the same memory (through DLPack) whose
storage is exactly the view, at offset 0. It matches a primal with its own contiguous storage, so forward AD uses it
as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exact_alias(t: Tensor) -> Tensor:
    """``t``'s memory as a tensor whose storage is exactly ``t`` (offset 0): ``t`` itself when it already is, else an
    alias through DLPack (writes through either show in both; the alias keeps ``t``'s memory alive). A tensor that
    DLPack cannot export as it is (non-contiguous, requiring grad, conjugated or negated bits, a functorch wrapper)
    is returned unchanged: forward AD then copies it, as it would have anyway."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    if not t.is_contiguous() or t.requires_grad or t.is_conj() or t.is_neg():
        return t
    try:
        return torch.from_dlpack(t)
    except (RuntimeError, TypeError, BufferError):
        return t
