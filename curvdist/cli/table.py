"""The readable table the CLI prints."""

from __future__ import annotations

from typing import Any


def fmt_value(r: dict[str, Any]) -> str:
    v = r["value"]
    if r["query"] == "eigs":
        return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
    if r["query"] == "density":
        lo, hi = r["info"]["support"]
        return f"support [{lo:.4g}, {hi:.4g}]"
    if r["query"] == "flatness":
        return ", ".join(f"{k} {x:.6g}" for k, x in v.items())
    if r["query"] == "diag":
        return f"sum {r['info']['sum']:.6g} ({len(v)} entries)"
    return f"{v:.6g}" if isinstance(v, (int, float)) else str(v)


def fmt_err(e: Any) -> str:
    if e is None:
        return "-"
    if isinstance(e, dict):
        return ", ".join(fmt_err(x) for x in e.values())
    if isinstance(e, list):
        return f"mean {sum(e) / max(len(e), 1):.2g}"
    return f"{e:.2g}" if isinstance(e, (int, float)) else str(e)


def render(results: list[dict[str, Any]]) -> str:
    head = ["query", "curvature", "metric", "coords", "value", "stderr", "matvecs", "seconds", "converged"]
    rows = [[r["query"], r["curvature"], r["metric"], r["coordinates"], fmt_value(r), fmt_err(r["stderr"]),
             str(r["matvecs"]), f"{r['seconds']:.2f}", "yes" if r["converged"] else "NO"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def render_invariance(rows: list[dict[str, Any]]) -> str:
    """The θ-vs-ψ table: quantity, curvature, metric, θ value, ψ value, relative change."""
    head = ["quantity", "curvature", "metric", "theta", "psi", "rel. change"]
    body = [[r["quantity"], r["curvature"], r["metric"], f"{r['theta']:.10g}", f"{r['psi']:.10g}",
             f"{r['relative_change']:.2e}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    return "\n".join([line, "-" * len(line)] + ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body])
