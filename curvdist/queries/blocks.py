"""Block-wise invariant spectra: the eigenvalues of M_b⁻¹C_b for every layer block b.

Partition θ into blocks (the parameters of one layer, or one parameter each). For each block the curvature block
C_b = C[b, b] (the Hessian/GGN/Fisher of the loss in the block's parameters with the others held fixed) and the
metric block M_b = M[b, b] define a generalized eigenproblem C_b v = λ M_b v. Its eigenvalues are invariant under
reparametrizations that act within blocks (and carry the metric along), and tr(M_b⁻¹C_b) and λ_max(M_b⁻¹C_b) are
*per-layer flatness* measures.

The union of the block spectra approximates the spectrum of M⁻¹C by dropping the cross-block terms of C
(a block-Jacobi approximation). For a metric that is block-diagonal in this partition (diagonal and Kronecker
metrics, the Euclidean metric) the traces agree exactly, Σ_b tr(M_b⁻¹C_b) = tr(M⁻¹C), while the eigenvalues do
not; the approximation error of the top eigenvalues and of the trace is reported against the full matrix-free
(or, for small models, dense) result on the same model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ..catalogue import Grouping, names, parse
from ..errors import ProblemError, SolverError
from ..geometry.metrics import Metric
from ..geometry.metrics import metric as build_metric
from ..operators import operator as build_operator
from ..problem.base import BaseProblem
from .api import coordinates_of, eigs, trace
from .result import Result

GROUPINGS = tuple(names(Grouping))


def stack_block(name: str) -> str:
    """The block of a stack a parameter belongs to: its path up to the first numeric component (``transformer.h.3``
    for ``transformer.h.3.attn.c_attn.weight``); outside numbered stacks, its owning module (``transformer.wte``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name.rpartition(".")[0] or "(model)"


def _source_names(problem: BaseProblem) -> tuple[str, ...]:
    """The names to group by: the parameter names, or for a reparametrized problem the ψ names its
    reparametrization declares (``reparam.psi_names``: the θ names for per-tensor reparametrizations), so that the
    blocks of θ and ψ correspond."""
    model = problem.model
    reparam, psi_names = getattr(model, "reparam", None), getattr(model, "psi_param_names", None)
    if reparam is None or psi_names is None:
        return problem.param_names
    label = dict(zip(psi_names, reparam.psi_names))
    return tuple(label.get(n, n) for n in problem.param_names)


def partition(problem: BaseProblem, groups: str | Mapping[str, Sequence[str]] = "layer") -> dict[str, list[str]]:
    """Blocks of the problem's parameters: by owning module (``layer``), by block of a numbered stack such as the
    blocks of a transformer (``block``, :func:`stack_block`), one per parameter (``parameter``), or an explicit
    mapping block name → parameter names (which must partition the selected parameters)."""
    names = list(problem.param_names)
    if isinstance(groups, Mapping):
        out = {k: list(v) for k, v in groups.items()}
        flat = [n for v in out.values() for n in v]
        if sorted(flat) != sorted(names):
            raise SolverError(f"the blocks must partition the selected parameters {names}, got {out}")
        return out
    if groups == "parameter":
        return {n: [n] for n in names}
    if groups == "layer":
        out = {}
        for n in names:
            out.setdefault(n.rpartition(".")[0] or "(model)", []).append(n)
        return out
    if groups == "block":
        out = {}
        for n, label in zip(names, _source_names(problem)):
            out.setdefault(stack_block(label), []).append(n)
        return out
    parse(Grouping, groups, "block grouping")  # raises UnknownNameError listing the choices
    raise AssertionError("unreachable")


def _generalized_eigvals(C: torch.Tensor, M: torch.Tensor | None) -> np.ndarray:
    """Eigenvalues of M⁻¹C (C symmetric, M SPD) in descending order, in float64."""
    Cn = C.detach().double().cpu().numpy()
    Cn = 0.5 * (Cn + Cn.T)
    if M is None:
        return np.sort(scipy.linalg.eigh(Cn, eigvals_only=True))[::-1]
    Mn = M.detach().double().cpu().numpy()
    return np.sort(scipy.linalg.eigh(Cn, 0.5 * (Mn + Mn.T), eigvals_only=True))[::-1]


def block_spectra(problem: BaseProblem, curvature: str = "ggn", metric: str | None = "kfac", damping: float = 1e-3,
                  groups: str | Mapping[str, Sequence[str]] = "layer", k: int = 10, compare: bool = True,
                  dense_block_dim: int = 1024, max_dense_dim: int = 3000, trace_matvecs: int = 60, metric_options: dict[str, Any] | None = None,
                  operator_options: dict[str, Any] | None = None, seed: int = 0) -> Result:
    """Per-block generalized spectra of (C_b, M_b) and their union against the full spectrum of M⁻¹C.

    Args:
        curvature: operator kind of C (``hessian``, ``ggn``, ``fisher``...).
        metric: metric kind of M (``None`` for the Euclidean metric), built with ``damping`` and
            ``metric_options`` on each block's sub-problem — which is the block M[b, b] of the full metric.
        groups: ``layer`` (parameters of one module), ``parameter`` or an explicit mapping.
        k: number of top eigenvalues compared.
        compare: also compute the full spectrum (dense generalized eigenproblem up to ``max_dense_dim``
            parameters, else Lanczos for the top k and Hutch++ for the trace) and report the errors.
        dense_block_dim: blocks up to this size get their whole spectrum from dense matrices; larger blocks (the
            blocks of a transformer) get their top k eigenvalues by Lanczos and their trace by Hutch++ with
            ``trace_matvecs`` products (``method`` in each block's entry says which).

    ``value``: ``{"blocks": {block: {"eigenvalues", "trace", "max", "dim"}}, "union_top", "full_top",
    "top_rel_error", "union_trace", "full_trace", "trace_rel_error"}``.
    """
    if not isinstance(problem, BaseProblem):
        raise ProblemError(f"block_spectra needs a curvdist problem whose parameters this process holds (local or "
                           f"data-parallel), got {type(problem).__name__}")
    t0 = time.perf_counter()
    blocks = partition(problem, groups)
    metric_options, operator_options = dict(metric_options or {}), dict(operator_options or {})

    def metric_of(p: BaseProblem) -> Metric | None:
        return None if metric is None else build_metric(p, metric, damping, **metric_options)

    out: dict[str, dict[str, Any]] = {}
    for name, params in blocks.items():
        sub = problem.restricted(params)
        C_op, M = build_operator(sub, curvature, **operator_options), metric_of(sub)
        if sub.dim <= dense_block_dim:
            lam = _generalized_eigvals(C_op.to_dense(), None if M is None else M.to_dense())
            out[name] = {"eigenvalues": lam.tolist(), "trace": float(lam.sum()), "max": float(lam[0]),
                         "dim": sub.dim, "method": "dense"}
        else:  # a large block (a transformer block): top k by Lanczos, the trace by Hutch++
            top = [float(v) for v in eigs(C_op, k=min(k, sub.dim), metric=M, seed=seed).value]
            tr = float(trace(C_op, metric=M, seed=seed, matvecs=trace_matvecs).value)
            out[name] = {"eigenvalues": top, "trace": tr, "max": top[0], "dim": sub.dim,
                         "method": f"lanczos+hutchpp({trace_matvecs})"}
    union = np.sort(np.concatenate([np.asarray(b["eigenvalues"]) for b in out.values()]))[::-1]
    k = min(k, union.size)
    value: dict[str, Any] = {"blocks": out, "union_top": union[:k].tolist(), "union_trace": float(union.sum())}
    info: dict[str, Any] = {"groups": groups if isinstance(groups, str) else "custom", "k": k}
    if compare:
        op = build_operator(problem, curvature, **operator_options)
        M = metric_of(problem)
        if problem.dim <= max_dense_dim:
            full = _generalized_eigvals(op.to_dense(), None if M is None else M.to_dense())
            full_top, full_trace, info["full_method"] = full[:k], float(full.sum()), "dense"
        else:
            full_top = np.asarray(eigs(op, k=k, metric=M, seed=seed).value)
            full_trace = float(trace(op, metric=M, seed=seed, matvecs=150).value)
            info["full_method"] = "lanczos+hutchpp"
        value.update(full_top=full_top.tolist(), full_trace=full_trace,
                     top_rel_error=(np.abs(union[:k] - full_top) / np.abs(full_top)).tolist(),
                     trace_rel_error=abs(value["union_trace"] - full_trace) / abs(full_trace))
    label = "euclidean" if metric is None else f"{metric}(δ={damping:g})"
    return Result(query="block_spectra", value=value, seconds=time.perf_counter() - t0, seed=seed,
                  dtype=str(problem.dtype).replace("torch.", ""), curvature=curvature, metric=label, info=info,
                  coordinates=coordinates_of(problem), backend=problem.backend)
