"""Plot a DeepSpeed run's logged curvature over training: the training loss and every scalar the curvature monitor
logged, from the ``history.json`` that train.py writes.

    python launchers/deepspeed/plot.py results/deepspeed/history.json launchers/deepspeed/flatness.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(history: dict, out: Path) -> None:
    names = sorted({n for h in history["history"] for n in h["values"]})
    panels = 1 + len(names)
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    steps, losses = zip(*history["losses"]) if history["losses"] else ((), ())
    flat[0].plot(steps, losses, lw=0.8, color="0.3")
    flat[0].set_title("training loss (mean over ranks)", fontsize=9)
    for ax, name in zip(flat[1:], names):
        pts = [(h["step"], h["values"][name]) for h in history["history"] if name in h["values"]]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1)
        ax.set_title(name.split("/", 1)[-1], fontsize=9)
        if all(v > 0 for _, v in pts):
            ax.set_yscale("log")
    for ax in flat[panels:]:
        ax.axis("off")
    for ax in flat[:panels]:
        ax.set_xlabel("global step", fontsize=8)
        ax.tick_params(labelsize=7)
    cfg = history.get("config", {}).get("curvdist", {})
    metric = cfg.get("monitor", {}).get("metric", {})
    pre = cfg.get("preconditioner")
    fig.suptitle(f"{history['model']} on digits, DeepSpeed ZeRO-{history['zero_stage']}, {history['world_size']} "
                 f"ranks; monitor metric {metric.get('kind', 'euclidean')}+{metric.get('damping', 0)}"
                 + (f"; preconditioner {pre['metric']['kind']}" if pre else ""), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("history", nargs="?", default="results/deepspeed/history.json")
    p.add_argument("output", nargs="?", default="launchers/deepspeed/flatness.png")
    args = p.parse_args()
    plot(json.loads(Path(args.history).read_text()), Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
