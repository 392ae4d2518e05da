"""Pipeline mode, stage side: Kronecker factors of a stage's own layers from the activations and output gradients
that pass through it.

BackPACK backpropagates curvature through a whole model in one process and cannot cross stage boundaries; the
probes of :mod:`curvdist.geometry.blocks.probes` can. Per batch, the stages run the forward pass in order (each on
an instrumented copy of its modules, recording its layers' inputs), the last stage forms the K output-space
vectors U (the columns of Λ's factor for KFLR, sampled gradients for KFAC, exactly as locally), and the K vectors
are backpropagated stage by stage: each stage takes the gradients w.r.t. its output, accumulates its layers'
output-side statistics from its probes, and passes the gradients w.r.t. its input on. The factors never leave the
stage: each stage normalizes and eigendecomposes its own (as distributed K-FAC spreads layers over workers) and
applies its diagonal blocks of M_δ^p to its shard of a vector.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MetricError
from ..geometry.blocks.kronecker import PER_EVENT, KroneckerStats
from ..geometry.blocks.probes import MATRIX_FREE_HINT, check_calls, instrumented_copy
from ..geometry.metrics.kfac import KFACMetric, normalized_factors
from ..operators.output_space import output_factors
from ..problem.autodiff import differentiable_kernels


class StageBlocks:
    """The Kronecker statistics of one stage's layers and, once finished, their metric blocks."""

    def __init__(self, module: nn.Module, names: list[str], shapes: list[torch.Size], kfac_approx: str = "expand"
                 ) -> None:
        self.twin, self.rec, plan = instrumented_copy(module, names)
        if plan.exact:
            raise MetricError(f"pipeline kfac/kflr blocks need a layer rule for every parameter of a stage; "
                              f"{plan.exact} have none (their exact blocks need per-sample passes through the "
                              f"later stages). {MATRIX_FREE_HINT}")
        self.names, self.shapes, self.approx = names, shapes, kfac_approx
        self.saved: dict[int, tuple[Tensor, Tensor, list[Any]]] = {}
        self.reset()
        self.metric: KFACMetric | None = None

    def reset(self) -> None:
        self.stats = KroneckerStats(self.names, {n: s.numel() for n, s in zip(self.names, self.shapes)},
                                    self.approx)

    def forward(self, b: int, x: Tensor, first_stage: bool) -> Tensor:
        """Run the stage on its input (recording its layers' inputs); keep the graph for the backward passes."""
        x_in = x.detach()
        if not first_stage and x_in.is_floating_point():
            x_in.requires_grad_(True)
        self.rec.begin(x_in.shape[0])
        with torch.enable_grad(), differentiable_kernels():
            out = self.twin(x_in)
        check_calls(self.rec, self.names, x_in.shape[0])
        sites = list(self.rec.sites)
        self.stats.add_inputs(sites)
        self.saved[b] = (x_in, out, sites)
        return out.detach()

    def backward(self, b: int, grads_out: Tensor) -> Tensor | None:
        """Accumulate the output-side statistics for the K vectors ``grads_out`` (K, *output shape); return the
        K gradients w.r.t. the stage input (None at the first stage)."""
        x_in, out, sites = self.saved.pop(b)
        inputs = [s.probe for s in sites] + ([x_in] if x_in.requires_grad else [])
        K = grads_out.shape[0]
        to_input = []
        with torch.enable_grad():
            for k in range(K):
                grads = torch.autograd.grad(out, inputs, grads_out[k].to(out.dtype), retain_graph=k < K - 1,
                                            allow_unused=True)
                self.stats.add_outputs(sites, [torch.zeros_like(site.probe) if g is None else g
                                               for site, g in zip(sites, grads)])
                if x_in.requires_grad:
                    g = grads[-1]
                    to_input.append((torch.zeros_like(x_in) if g is None else g).detach())
        return torch.stack(to_input) if to_input else None

    def finish(self, scale: float, num_samples: int, damping: float, kind: str) -> float:
        """Normalize and eigendecompose this stage's factors; returns log det of its blocks of M_δ."""
        G, A = self.stats.result()
        self.metric = KFACMetric(self.names, self.shapes, normalized_factors(self.names, G, A, scale, num_samples),
                                 damping=damping, kind=kind)
        self.reset()
        return self.metric.logdet()


def output_vectors(loss: Any, out: Tensor, y: Tensor, kind: str, first: int, mc_samples: int, seed: int) -> Tensor:
    """The last stage's K output-space vectors (see :func:`~curvdist.operators.output_space.output_factors`);
    ``first``: the global index of the micro-batch's first sample (its Monte-Carlo labels' key)."""
    return output_factors(SimpleNamespace(loss=loss), out, y, kind, first, mc_samples, seed,  # type: ignore[arg-type]
                          per_event=PER_EVENT[kind])
