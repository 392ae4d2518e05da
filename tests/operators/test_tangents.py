"""Tangents forward-mode AD takes without copying (exact_alias)."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp

from curvdist.operators.tangents import exact_alias


def test_exact_alias_is_the_same_memory_with_storage_bounds_of_its_own():
    flat = torch.arange(100, dtype=torch.float64)
    view = flat[30:50].view(4, 5)
    alias = exact_alias(view)
    assert alias.data_ptr() == view.data_ptr() and alias.storage_offset() == 0
    assert alias.untyped_storage().nbytes() == 20 * 8 and torch.equal(alias, view)
    alias[0, 0] = -1.0
    flat[49] = -2.0
    assert flat[30] == -1.0 and alias[3, 4] == -2.0
    own = torch.zeros(3, 4)
    assert exact_alias(own) is own
    strided = flat[::2]
    assert exact_alias(strided) is strided  # DLPack would keep the strides: returned as it is


def test_forward_ad_copies_a_view_of_a_flat_vector_but_not_its_exact_alias():
    """The reason for exact_alias: a dual's tangent that is a view into a larger storage is copied (new memory),
    its exact alias is used as it is."""
    primal = torch.randn(4, 5, dtype=torch.float64)
    flat = torch.randn(100, dtype=torch.float64)
    view = flat[30:50].view(4, 5)
    with fwAD.dual_level():
        copied = fwAD.unpack_dual(fwAD.make_dual(primal, view)).tangent
        kept = fwAD.unpack_dual(fwAD.make_dual(primal, exact_alias(view))).tangent
    assert copied.data_ptr() != view.data_ptr() and torch.equal(copied, view)
    assert kept.data_ptr() == view.data_ptr()


def test_jvp_with_exact_aliases_equals_jvp_with_views():
    g = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    v = torch.randn(48, generator=g, dtype=torch.float64)
    views = (v[:30].view(6, 5), v[30:].view(3, 6))

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ torch.tanh(a @ x)

    expected = jvp(f, (W1, W2), views)[1]
    assert torch.equal(jvp(f, (W1, W2), tuple(exact_alias(t) for t in views))[1], expected)
