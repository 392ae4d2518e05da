"""Benchmark: RiemannianSGD's step time per metric kind relative to SGD and Adam (CNN and transformer block on
digits), and the wall time to a target training loss against Adam (digits MLP).

Step time: the median over ``--steps`` mini-batch steps (batch 128) of the steps without a metric refresh, plus
the cost of one refresh (best of 3, on a fixed 256-sample metric batch) divided by ``--refresh`` — the amortized
cost of a step with the metric rebuilt every ``--refresh`` steps; float32. Medians and best-of keep the numbers
stable on a shared machine. Time to target: full-batch training on the
1,437 digits training images until the training loss is ≤ ``--target``, each optimizer with the best learning rate
of a small grid (the grid and every run are in the JSON). Writes benchmarks/results/optimizer_benchmark.json.

    python benchmarks/optimizer_benchmark.py [--steps 20] [--refresh 10] [--target 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from curvdist import zoo
from curvdist.optim import RiemannianSGD

OUT = Path(__file__).parent / "results"
KINDS = ["euclidean", "diag_ggn", "diag_fisher_mc", "empirical_fisher_diag", "kfac", "kflr", "adam", "fisher"]
MODELS = {
    "cnn": (lambda: zoo.cnn((8, 16), seed=0), "image"),
    "transformer": (lambda: zoo.transformer(d_model=32, heads=4, seed=0, positions="embedding"), "sequence"),
}


def _optimizer(kind: str, model: torch.nn.Module, metric_data: Any, refresh: int) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01)
    if kind == "torch_adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    options = {"method": "cg", "cg_tol": 1e-4} if kind == "fisher" else {}
    return RiemannianSGD(model, "cross_entropy", metric_data, metric=kind, lr=0.01, damping=0.1, refresh=refresh,
                         metric_options=options)


def step_times(steps: int, refresh: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (make, shape) in MODELS.items():
        X, y = zoo.digits(shape=shape)
        metric_data = (X[:256], y[:256])
        rows, refresh_cost = {}, {}
        for kind in ["sgd", "torch_adam", *KINDS]:
            model = make()
            opt = _optimizer(kind, model, metric_data, refresh)
            times = []
            for s in range(steps + 1):
                i = (s * 128) % (len(y) - 128)
                refreshing = isinstance(opt, RiemannianSGD) and kind != "adam" and opt.steps % refresh == 0
                t0 = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X[i:i + 128]), y[i:i + 128]).backward()
                opt.step()
                if s > 0 and not refreshing:  # the first step warms up
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            if isinstance(opt, RiemannianSGD) and kind != "adam":
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    opt.refresh_metric()
                    best = min(best, time.perf_counter() - t0)
                refresh_cost[kind] = best
                step += best / refresh
            rows[kind] = step
        base_sgd, base_adam = rows["sgd"], rows["torch_adam"]
        out[name] = {k: {"seconds_per_step": v, "vs_sgd": v / base_sgd, "vs_adam": v / base_adam,
                         "seconds_per_refresh": refresh_cost.get(k)} for k, v in rows.items()}
        out[name]["parameters"] = sum(p.numel() for p in make().parameters())
        print(name, {k: f"{v:.4f}s ({v / base_adam:.1f}× Adam)" for k, v in rows.items()}, flush=True)
    return out


def time_to_target(target: float, max_steps: int) -> dict[str, Any]:
    X, y = zoo.digits()
    runs = []
    grids = {"adam": [3e-3, 1e-2, 3e-2, 0.1], "kfac": [0.03, 0.1, 0.3], "diag_ggn": [0.03, 0.1, 0.3]}
    for method, lrs in grids.items():
        for lr in lrs:
            model = zoo.mlp(64, (32,), 10, seed=0)
            opt = (torch.optim.Adam(model.parameters(), lr=lr) if method == "adam" else
                   RiemannianSGD(model, "cross_entropy", (X, y), metric=method, lr=lr, damping=0.01, refresh=5))
            t0, reached, loss = time.perf_counter(), None, float("nan")
            for step in range(1, max_steps + 1):
                opt.zero_grad()
                out = torch.nn.functional.cross_entropy(model(X), y)
                out.backward()
                opt.step()
                with torch.no_grad():
                    loss = float(torch.nn.functional.cross_entropy(model(X), y))
                if loss <= target:
                    reached = step
                    break
            runs.append({"method": method, "lr": lr, "steps": reached, "seconds": time.perf_counter() - t0,
                         "final_loss": loss})
            print(runs[-1], flush=True)
    best = {}
    for method in grids:
        ok = [r for r in runs if r["method"] == method and r["steps"] is not None]
        best[method] = min(ok, key=lambda r: r["seconds"]) if ok else None
    return {"target_loss": target, "max_steps": max_steps, "runs": runs, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--refresh", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--max-steps", type=int, default=1500)
    args = ap.parse_args()
    torch.manual_seed(0)
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "settings": vars(args),
           "step_time": step_times(args.steps, args.refresh),
           "time_to_target": time_to_target(args.target, args.max_steps)}
    OUT.mkdir(exist_ok=True)
    (OUT / "optimizer_benchmark.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["time_to_target"]["best"], indent=2))


if __name__ == "__main__":
    main()
