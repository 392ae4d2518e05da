"""An explicit forward pass of ``nn.MultiheadAttention`` whose two projections are recorded sites.

For self-attention (query, key and value the same tensor x of shape (B, T, E)) with h heads of size d = E/h:

    [Q K V] = x W_inᵀ + b_in                       (the fused projection, one Linear site, W_in ∈ ℝ^{3E×E})
    A_i = softmax(Q_i K_iᵀ / √d + mask) V_i        (per head i)
    z = [A_1 … A_h] W_outᵀ + b_out                 (out_proj, a second Linear site)

which is what ``torch.nn.functional.multi_head_attention_forward`` computes without dropout; the test suite checks
the two agree. Masks follow torch's conventions: boolean ``True`` = not allowed, float masks are added.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...errors import MetricError

if TYPE_CHECKING:
    from .probes import Recorder


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def explicit_attention(m: nn.MultiheadAttention, path: str, rec: Recorder, roles: dict[str, str],
                       out_roles: dict[str, str], query: Tensor, key: Tensor, value: Tensor,
                       key_padding_mask: Tensor | None = None, need_weights: bool = True,
                       attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                       is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    if not (query is key and key is value):
        raise MetricError(f"'{path}' (MultiheadAttention) is called with different query/key/value tensors; the "
                          f"block kernels support the fused projection for self-attention only")
    x = query if m.batch_first else query.transpose(0, 1)
    if x.ndim != 3:
        raise MetricError(f"'{path}' (MultiheadAttention): expected batched 3-d input, got {tuple(query.shape)}")
    B, T, E = x.shape
    h = m.num_heads
    d = E // h
    qkv = rec.linear_apply(f"{path}.in_proj", x, m.in_proj_weight, m.in_proj_bias,
                           {"weight": roles["in_proj_weight"], "bias": roles.get("in_proj_bias", "")})
    q, k, v = (t.reshape(B, T, h, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, T, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, h, T, T)
    mask = _additive(attn_mask, scores.dtype)
    if mask is None and is_causal:
        mask = _additive(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), scores.dtype)
    if mask is not None:
        scores = scores + (mask.reshape(B, h, T, T) if mask.ndim == 3 else mask)
    kpm = _additive(key_padding_mask, scores.dtype)
    if kpm is not None:
        scores = scores + kpm.reshape(B, 1, 1, T)
    weights = torch.softmax(scores, dim=-1)
    heads = (weights @ v).transpose(1, 2).reshape(B, T, E)
    out = rec.linear_apply(f"{path}.out_proj", heads, m.out_proj.weight, m.out_proj.bias,
                           {"weight": out_roles["weight"], "bias": out_roles.get("bias", "")})
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights
