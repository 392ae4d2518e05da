"""Statistics from the training step under data parallelism: each rank tracks its own micro-batches
(:class:`curvdist.optim.step_statistics.StepStatistics`), and a step's sums — Kronecker factors or the diagonal,
with the counts of loss terms and samples — are summed over the data-parallel group before they enter the moving
averages, so every rank holds the statistics of the whole global batch, as one process training on it would.

Sampled statistics (``kfac``, ``diag_fisher_mc``) draw their labels on each rank with the seed offset by the rank:
a valid sample of the same distribution, but not the one a single process draws. ``kflr``, ``diag_ggn`` and
``empirical_fisher_diag`` are exact and equal the single-process statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import MetricError
from ...geometry.structured import LowRankFactor
from ...optim.step_statistics import StepStatistics
from .data_parallel import group_rank_and_size


class ReducedStepStatistics(StepStatistics):
    """:class:`StepStatistics` whose step sums are ``all_reduce``-d over ``group`` (None: the default group)."""

    def __init__(self, model: nn.Module, names: Any, loss: Any, kind: str, decay: float = 0.95, *,
                 group: Any = None, **options: Any) -> None:
        super().__init__(model, names, loss, kind, decay, **options)
        self.group = group
        self._base_seed = self.seed

    def track(self, y: Tensor, attention_mask: Tensor | None = None) -> Any:
        # the rank is known once torch.distributed is initialized (after the optimizer is built)
        self.seed = self._base_seed + group_rank_and_size(self.group)[0]
        return super().track(y, attention_mask)

    def reduce(self, sums: Any, terms: int, samples: int) -> tuple[Any, int, int]:
        counts = torch.tensor([float(terms), float(samples)], dtype=torch.float64)
        dist.all_reduce(counts, group=self.group)
        return _all_reduced(sums, self.group), int(counts[0]), int(counts[1])


def _all_reduced(tree: Any, group: Any) -> Any:
    """Σ_ranks of a tree of tensors and counts (ints: the input sides' C) — copies; None leaves stay None."""
    if isinstance(tree, dict):
        return {k: _all_reduced(v, group) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_all_reduced(v, group) for v in tree)
    if isinstance(tree, LowRankFactor):
        raise MetricError("a structured (vocabulary-sized) Kronecker factor cannot be reduced over data-parallel "
                          "ranks from the training step yet; use statistics='separate' for this model")
    if isinstance(tree, Tensor):
        out = tree.detach().clone()
        dist.all_reduce(out, group=group)
        return out
    if isinstance(tree, int) and not isinstance(tree, bool):
        count = torch.tensor([tree], dtype=torch.int64)
        dist.all_reduce(count, group=group)
        return int(count[0])
    return tree
