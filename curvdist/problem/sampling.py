"""Monte-Carlo labels that are functions of the data, not of how the data are split (DESIGN §8).

A sampled label is drawn from a uniform number keyed by (seed, global sample index, position, draw, stream): the
same sample gets the same label in one process, on data shards, on ranks and in pipeline micro-batches, whatever
the batching. The uniform comes from a counter-based hash (SplitMix64's finalizer, Steele, Lea & Flood 2014,
applied to the key fields in turn; no state, vectorized in int64 arithmetic), and a label from it by inversion of
the predictive distribution's CDF (categorical) or Box–Muller (Gaussian).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finalizer: a bijection of 64-bit words with good avalanche (wrapping int64 arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


@dataclass(frozen=True)
class SampleKeys:
    """The keys of one batch's draws: ``seed`` and the global index ``first`` of its first sample (samples
    ``first``, ``first + 1``, … in batch order)."""

    seed: int
    first: int

    def uniform(self, samples: int, batch: int, positions: int | None = None, stream: int = 0) -> Tensor:
        """U(0, 1) numbers of shape (samples, batch[, positions]) in float64, the entry (s, b[, t]) a function of
        (seed, first + b, t, s, stream) only."""
        n = torch.arange(self.first, self.first + batch, dtype=torch.int64)
        s = torch.arange(samples, dtype=torch.int64)
        shape = (samples, batch) if positions is None else (samples, batch, positions)
        h = _mix(torch.full((), int(self.seed), dtype=torch.int64))
        h = _mix(h ^ n.view(1, batch, *([1] if positions is not None else [])))
        if positions is not None:
            h = _mix(h ^ torch.arange(positions, dtype=torch.int64).view(1, 1, positions))
        h = _mix(h ^ s.view(samples, *([1] * (len(shape) - 1))))
        h = _mix(h ^ int(stream)).expand(shape)
        return (_shr(h, 11).to(torch.float64) + 0.5) * 2.0**-53  # in (0, 1): never 0 or 1

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, first sample): for user losses that draw with a generator (their
        labels then depend on the batching)."""
        return torch.Generator(device="cpu").manual_seed((int(self.seed) * 1_000_003 + self.first) % 2**63)


def categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Draws from Categorical(probs[..., :]) by inverting the CDF at ``u``: ``probs`` (*batch, C), ``u``
    (S, *batch) → indices (S, *batch). Exact in float64 (the CDF's last entry is taken as the total)."""
    p = probs.to(torch.float64)
    cdf = torch.cumsum(p, dim=-1)
    flat = cdf.reshape(-1, cdf.shape[-1])
    values = (u.reshape(u.shape[0], -1).T.to(flat.device) * flat[:, -1:]).contiguous()  # (rows, S)
    idx = torch.searchsorted(flat, values, right=True).clamp_max(cdf.shape[-1] - 1)
    return idx.T.reshape(u.shape)


def gaussian(keys: SampleKeys, samples: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal draws (samples, *shape), float64, by Box–Muller on two keyed streams; the entry of sample b
    (the first axis of ``shape``) and flat position t depends only on (seed, first + b, t, draw)."""
    batch, rest = shape[0], math.prod(shape[1:])
    u1 = keys.uniform(samples, batch, rest, stream=1)
    u2 = keys.uniform(samples, batch, rest, stream=2)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.reshape(samples, *shape)
