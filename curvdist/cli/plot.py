"""Plots written by the CLI (matplotlib, Agg backend; imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..queries import Result


def plot_densities(results: Sequence[Result], path: Path) -> None:
    """Spectral densities on a symmetric-log x axis and a log y axis, one curve per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        grid, phi = np.asarray(r.value["grid"]), np.asarray(r.value["density"])
        label = f"{r.curvature} ({r.metric}, {r.coordinates})"
        ax.plot(grid, np.maximum(phi, 1e-12), label=label)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density (Gaussian-smoothed SLQ)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
