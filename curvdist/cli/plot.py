"""Plots written by the CLI (matplotlib, Agg backend; imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..queries import Result


def plot_densities(results: Sequence[Result], path: Path) -> None:
    """Spectral densities, one panel per (curvature, metric), θ and ψ coordinates overlaid, log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        panels.setdefault((r.curvature.replace("riemannian_", ""), r.metric), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, ((curv, metric), rs) in zip(axes[0], panels.items()):
        for r, style in zip(rs, ("-", "--", ":")):
            grid, phi = np.asarray(r.value["grid"]), np.asarray(r.value["density"])
            ax.plot(grid, np.maximum(phi, 1e-12), style, label=f"{r.coordinates} ({r.curvature})")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        ax.set_title(f"spectrum of M⁻¹C: {curv}, metric {metric}")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (Gaussian-smoothed SLQ)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Every logged scalar against the training step, one panel each (the loss first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "seconds")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [h.get(key, float("nan")) for h in history], "o-", ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
