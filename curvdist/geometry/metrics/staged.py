"""The metrics of problems whose vectors no process holds whole — pipeline stages and ZeRO-3 partitions: the same
kinds with the same options, checked in one place.

``ggn``/``fisher`` are solved by CG over the problem's products (:class:`~.curvature.SolvedMetric`); ``kfac``,
``kflr``, ``ekfac`` and the exact diagonals are blocks computed where the parameters live, from sites
(:data:`~curvdist.geometry.blocks.kronecker.BLOCK_METRICS`).
"""

from __future__ import annotations

from typing import Any

from ...catalogue import MetricKind
from ...errors import MetricError

#: kind → the options it takes
STAGED_METRIC_OPTIONS: dict[str, tuple[str, ...]] = {
    MetricKind.EUCLIDEAN.value: (),
    MetricKind.GGN.value: ("method", "cg_tol", "cg_maxiter"),
    MetricKind.FISHER.value: ("method", "cg_tol", "cg_maxiter"),
    MetricKind.KFAC.value: ("mc_samples", "seed", "backend"),
    MetricKind.KFLR.value: ("backend",),
    MetricKind.EKFAC.value: ("fisher_type", "mc_samples", "seed", "backend"),
    MetricKind.DIAG_GGN.value: ("backend",),
    MetricKind.DIAG_FISHER_MC.value: ("mc_samples", "seed", "backend"),
    MetricKind.EMPIRICAL_FISHER_DIAG.value: ("backend",),
}


def check_staged_metric(kind: str, damping: float, options: dict[str, Any], where: str, hint: str = "") -> None:
    """Refuse a metric kind or option that ``where`` (e.g. "pipeline mode") does not offer, naming what it offers;
    pops and checks the ``method`` (CG only) and ``backend`` (own kernels only) options."""
    if kind not in STAGED_METRIC_OPTIONS or (kind == MetricKind.EUCLIDEAN and damping):
        offered = ", ".join(f"{k} ({', '.join(v) or 'no options'})" for k, v in STAGED_METRIC_OPTIONS.items())
        raise MetricError(f"{where} has no {kind!r} metric{' with damping' if kind == 'euclidean' else ''}; it "
                          f"offers: {offered} — ggn/fisher CG-solved, kfac/kflr/ekfac and the exact diagonals as blocks "
                          f"computed where the parameters live{hint}")
    unknown = sorted(set(options) - set(STAGED_METRIC_OPTIONS[kind]))
    if unknown:
        raise MetricError(f"the {where} {kind} metric takes the options {list(STAGED_METRIC_OPTIONS[kind])}, not "
                          f"{unknown}")
    if options.pop("method", "cg") not in ("auto", "cg"):
        raise MetricError(f"the {where} {kind} metric is solved by CG (method auto or cg): no process holds the "
                          f"dense matrix")
    if options.pop("backend", "torch") not in ("auto", "torch"):
        raise MetricError(f"{where} {kind} blocks come from curvdist's own kernels where the parameters live "
                          f"(backend auto or torch); BackPACK needs the whole model in one process")
