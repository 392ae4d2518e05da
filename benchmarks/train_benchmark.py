"""Benchmark: preconditioned training against AdamW, SOAP and Shampoo — wall time to a target validation loss.

Tasks (real data on every machine, nothing downloaded):

* ``decoder``: a GPT-2-style decoder (``curvdist.zoo.hf_causal_lm``, random seeded weights; byte vocabulary 256,
  context 128, n_embd 384, 6 layers, 6 heads: 10.8M parameters, head tied to the token embedding) on a byte-level
  corpus of this Python's own standard library sources (``sysconfig.get_paths()["stdlib"]``, ``*.py`` outside test
  folders, files sorted by path; every 10th file is validation; at most ``--corpus-mb`` MB). Batches of
  ``--batch`` random windows of 128 bytes (seeded); validation loss: the causal-LM loss (nats per byte) on 64 fixed
  windows of the validation files.
* ``cnn``: ``curvdist.zoo.cnn((8, 16))`` on scikit-learn's digits (training split, batches of 128; validation: the
  test split).

Methods, each with a small learning-rate grid (every run is in the JSON): ``adamw`` (torch, weight decay 0.01);
``rsgd_kfac`` (``RiemannianSGD``, KFAC from the training step's own forward pass, ``statistics="step"``, decay
0.95, refresh 10, momentum 0.9, damping 1e-3, ``kl_clip`` 1e-3); ``rsgd_ekfac`` (EKFAC built every 10 steps on a
fixed metric batch, a separate pass); ``rsgd_kfac_sub`` (as rsgd_kfac, statistics on every 2nd step,
``basis_update="subspace"``); ``rsgd_diag`` (the sampled-Fisher diagonal from the step); ``soap`` and
``shampoo`` (``pytorch_optimizer.SOAP``/``Shampoo``, their defaults besides the learning rate). One process,
``--threads`` torch threads. Each run trains for ``--budget`` seconds of wall time (evaluation excluded) and
evaluates every ``--every`` steps. The target is the best validation loss AdamW reaches over its grid; a method's
time to target is the training wall time of its first evaluation at or below it (best over its grid). Also
recorded: steps to target, time per step, the process's peak resident memory, and a PNG of validation loss
against wall time.

    python benchmarks/train_benchmark.py [--tasks cnn,decoder] [--budget 240] [--grid full|small]
        [--methods adamw,rsgd_kfac,...]

Writes benchmarks/results/train_benchmark.json and train_benchmark.png (``--out``). ``--ranks 2``: the runs on 2 DeepSpeed
ZeRO-2 ranks (adamw, rsgd_kfac). ``--invariance``: θ against NTK coordinates ψ (train_invariance.json/.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
DECODER = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 128, "n_embd": 384, "n_layer": 6, "n_head": 6}
CONTEXT = 128
GRIDS = {  # learning rates per method; --grid small: the middle one(s), for a run that fits a short session
    "decoder": {"adamw": [3e-4, 1e-3, 3e-3], "rsgd_kfac": [0.03, 0.1, 0.3], "rsgd_ekfac": [0.1, 0.3],
                "rsgd_diag": [0.01, 0.03], "soap": [1e-3, 3e-3], "shampoo": [1e-3, 3e-3],
                "rsgd_kfac_sub": [0.1, 0.3]},
    "cnn": {"adamw": [1e-3, 3e-3, 1e-2], "rsgd_kfac": [0.03, 0.1, 0.3], "rsgd_ekfac": [0.1, 0.3],
            "rsgd_diag": [0.01, 0.03], "soap": [1e-3, 3e-3], "shampoo": [1e-3, 3e-3], "rsgd_kfac_sub": [0.1, 0.3]},
}
SMALL = {"adamw": [1e-3, 3e-3], "rsgd_kfac": [0.1, 0.3], "rsgd_kfac_sub": [0.1, 0.3], "rsgd_ekfac": [0.3],
         "rsgd_diag": [0.03],
         "soap": [3e-3], "shampoo": [1e-3]}


# ---------------------------------------------------------------------- data
def python_corpus(max_mb: float) -> tuple[Any, Any, list[str]]:
    """(train bytes, validation bytes, the files read) from this Python's standard library sources."""
    import torch

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not ({"test", "tests", "idle_test", "site-packages"} & set(p.relative_to(root).parts)))
    train, val, used, size = [], [], [], 0
    for i, p in enumerate(files):
        data = p.read_bytes()
        (val if i % 10 == 9 else train).append(data)
        used.append(str(p.relative_to(root)))
        size += len(data)
        if size >= max_mb * 1e6:
            break

    def tensor(parts: list[bytes]) -> Any:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()

    return tensor(train), tensor(val), used


def windows(stream: Any, n: int, generator: Any) -> dict[str, Any]:
    import torch

    starts = torch.randint(0, len(stream) - CONTEXT, (n,), generator=generator)
    ids = torch.stack([stream[s:s + CONTEXT] for s in starts.tolist()])
    return {"input_ids": ids, "labels": ids}


# ---------------------------------------------------------------------- one run
def make_task(task: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from curvdist import zoo
    from curvdist.problem.losses import make_loss

    if task == "decoder":
        train, val, files = python_corpus(args.corpus_mb)
        g = torch.Generator().manual_seed(1)
        loss = make_loss("causal_lm")

        def batch(step: int) -> tuple[Any, Any, Any]:
            b = windows(train, args.batch, torch.Generator().manual_seed(1000 + step))
            return b["input_ids"], b["labels"], b

        return {"model": lambda: zoo.hf_causal_lm(config=DECODER, seed=0), "loss": loss, "loss_name": "causal_lm",
                "batch": batch, "val": windows(val, 64, g), "metric_batch": windows(train, 8, g),
                "corpus": {"files": len(files), "train_bytes": len(train), "val_bytes": len(val),
                           "stdlib": sysconfig.get_paths()["stdlib"].split(os.sep)[-1]}}
    X, y = zoo.digits(split="train", shape="image")
    Xv, yv = zoo.digits(split="test", shape="image")
    loss = make_loss("cross_entropy")

    def batch(step: int) -> tuple[Any, Any, Any]:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + step))[:128]
        return X[idx], y[idx], (X[idx], y[idx])

    return {"model": lambda: zoo.cnn((8, 16), seed=0), "loss": loss, "loss_name": "cross_entropy",
            "batch": batch, "val": (Xv, yv), "metric_batch": (X[:256], y[:256])}


def make_optimizer(method: str, lr: float, model: Any, t: dict[str, Any]) -> Any:
    import torch

    from curvdist.optim import RiemannianSGD

    common = {"lr": lr, "damping": 1e-3, "refresh": 10, "momentum": 0.9, "kl_clip": 1e-3}
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if method == "rsgd_kfac":
        return RiemannianSGD(model, t["loss_name"], metric="kfac", statistics="step", **common)
    if method == "rsgd_kfac_sub":  # cheaper refreshes: statistics every 2nd step, subspace basis updates
        return RiemannianSGD(model, t["loss_name"], metric="kfac", statistics="step", statistics_every=2,
                             basis_update="subspace", **common)
    if method == "rsgd_diag":
        return RiemannianSGD(model, t["loss_name"], metric="diag_fisher_mc", statistics="step", **common)
    if method == "rsgd_ekfac":
        return RiemannianSGD(model, t["loss_name"], t["metric_batch"], metric="ekfac", **common)
    import pytorch_optimizer as po

    if method == "soap":
        return po.SOAP(model.parameters(), lr=lr)
    if method == "shampoo":
        return po.Shampoo(model.parameters(), lr=lr)
    raise SystemExit(f"unknown method {method!r}")


def evaluate(model: Any, t: dict[str, Any]) -> float:
    import torch

    from curvdist.problem.outputs import network_output

    with torch.no_grad():
        model.eval()
        val = t["val"]
        if isinstance(val, dict):
            out = network_output(model(val["input_ids"]))
            value = float(t["loss"].per_sample(out, val["labels"]).sum() / t["loss"].count(val["labels"]))
        else:
            value = float(torch.nn.functional.cross_entropy(model(val[0]), val[1]))
        model.train()
    return value


def run(task: str, method: str, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train for the wall budget; the validation curve (training wall time, step, loss)."""
    import torch

    from curvdist.optim import RiemannianSGD
    from curvdist.problem.outputs import network_output
    from curvdist.resources import peak_rss_mb, reset_peak

    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(args.threads // world, 1))
    t = make_task(task, args)
    model = t["model"]()
    model.train()
    if task == "decoder":
        for m in model.modules():  # deterministic steps: no dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if world > 1:
        return run_ranks(task, method, lr, args, t, model, world)
    opt = make_optimizer(method, lr, model, t)
    reset_peak()
    curve = [{"seconds": 0.0, "step": 0, "val": evaluate(model, t)}]
    wall, step, step_times = 0.0, 0, []
    track = isinstance(opt, RiemannianSGD) and opt.step_statistics is not None
    while wall < args.budget:
        x, y, _ = t["batch"](step)
        t0 = time.perf_counter()
        opt.zero_grad()
        if track:
            with opt.track(y):
                out = network_output(model(x))
        else:
            out = network_output(model(x))
        loss = t["loss"].per_sample(out, y).sum() / t["loss"].count(y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        wall += dt
        step_times.append(dt)
        step += 1
        if not math.isfinite(float(loss)):
            curve.append({"seconds": wall, "step": step, "val": float("nan")})
            break
        if step % args.every == 0:
            curve.append({"seconds": wall, "step": step, "val": evaluate(model, t)})
    step_times.sort()
    return {"task": task, "method": method, "lr": lr, "curve": curve, "steps": step,
            "median_step_s": step_times[len(step_times) // 2], "peak_rss_mb": peak_rss_mb(),
            "parameters": sum(p.numel() for p in model.parameters()), **({"corpus": t["corpus"]} if "corpus" in t
                                                                       else {})}


def run_ranks(task: str, method: str, lr: float, args: argparse.Namespace, t: dict[str, Any], model: Any,
              world: int) -> dict[str, Any]:
    """The run on ``world`` DeepSpeed ZeRO-2 ranks (torchrun, gloo): every rank takes its share of each batch;
    ``adamw`` is torch's AdamW as DeepSpeed's client optimizer, ``rsgd_kfac`` DeepSpeedRiemannianSGD with KFAC from
    the training step reduced over the ranks and one owner per parameter (grad_worker_fraction 1/world). Rank 0
    evaluates (the others wait; evaluation is excluded from the wall time) and decides when the budget is spent."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from curvdist.integrations.deepspeed import DeepSpeedRiemannianSGD
    from curvdist.problem.outputs import network_output
    from curvdist.resources import peak_rss_mb, reset_peak

    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    elif method == "rsgd_kfac":
        opt = DeepSpeedRiemannianSGD(model, t["loss_name"], metric="kfac", statistics="step", lr=lr, damping=1e-3,
                                     refresh=10, momentum=0.9, kl_clip=1e-3, grad_worker_fraction=1.0 / world)
    else:
        raise SystemExit(f"{method} has no {world}-rank form here (adamw, rsgd_kfac)")
    x0, _, _ = t["batch"](0)
    per = int(x0.shape[0]) // world
    config = {"train_batch_size": per * world, "train_micro_batch_size_per_gpu": per,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    rank = dist.get_rank()
    reset_peak()
    curve = [{"seconds": 0.0, "step": 0, "val": evaluate(model, t)}]
    wall, step, step_times = 0.0, 0, []
    go = torch.ones(1)
    while True:
        go[0] = float(wall < args.budget)
        dist.broadcast(go, src=0)
        if not go.item():
            break
        x, y, _ = t["batch"](step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        t0 = time.perf_counter()
        if method == "rsgd_kfac":
            with opt.track(y):
                out = network_output(engine(x))
        else:
            out = network_output(engine(x))
        loss = t["loss"].per_sample(out, y).sum() / t["loss"].count(y)
        engine.backward(loss)
        engine.step()
        dt = time.perf_counter() - t0
        wall += dt
        step_times.append(dt)
        step += 1
        if step % args.every == 0 and rank == 0:
            curve.append({"seconds": wall, "step": step, "val": evaluate(model, t)})
    step_times.sort()
    rss = torch.tensor([peak_rss_mb() or 0.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    return {"task": task, "method": f"{method}@{world}ranks", "lr": lr, "curve": curve, "steps": step,
            "median_step_s": step_times[len(step_times) // 2], "peak_rss_mb": float(rss[0]), "ranks": world,
            "zero_stage": 2, "parameters": sum(p.numel() for p in model.parameters()), "rank": rank}


# ---------------------------------------------------------------------- summary
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        rs = [r for r in runs if r["task"] == task and "curve" in r]
        adamw = [r for r in rs if r["method"] == "adamw"]
        if not adamw:
            continue
        target = min(min(p["val"] for p in r["curve"] if math.isfinite(p["val"])) for r in adamw)

        def reach(r: dict[str, Any]) -> dict[str, Any] | None:
            return next((p for p in r["curve"] if math.isfinite(p["val"]) and p["val"] <= target), None)

        rows = {}
        for method in sorted({r["method"] for r in rs}):
            best = None
            for r in (r for r in rs if r["method"] == method):
                hit = reach(r)
                final = min(p["val"] for p in r["curve"] if math.isfinite(p["val"]))
                row = {"lr": r["lr"], "best_val": final, "time_to_target_s": hit["seconds"] if hit else None,
                       "steps_to_target": hit["step"] if hit else None, "median_step_s": r["median_step_s"],
                       "peak_rss_mb": r["peak_rss_mb"]}
                key = (row["time_to_target_s"] is None, row["time_to_target_s"] or 0.0, final)
                if best is None or key < best[0]:
                    best = (key, row)
            assert best is not None
            rows[method] = best[1]
        t_adamw = rows["adamw"]["time_to_target_s"]
        for row in rows.values():
            row["over_adamw"] = (row["time_to_target_s"] / t_adamw) if row["time_to_target_s"] and t_adamw else None
        out[task] = {"target_val": target, "methods": rows,
                     "goal_rsgd_le_0.8x_adamw": any((r["over_adamw"] or math.inf) <= 0.8
                                                    for m, r in rows.items() if m.startswith("rsgd"))}
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs if "curve" in r})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in runs if r["task"] == task and "curve" in r):
            xs = [p["seconds"] for p in r["curve"]]
            ys = [p["val"] for p in r["curve"]]
            ax.plot(xs, ys, label=f"{r['method']} lr={r['lr']:g}", lw=1)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("validation loss")
        ax.set_title(task)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------- invariance
def invariance(args: argparse.Namespace) -> dict[str, Any]:
    """The same network trained from the same point in θ and in NTK coordinates ψ (θ = σ_w/√fan_in·ψ for weights,
    σ_b·ψ for biases: ``cd.reparametrize(problem, ntk())``): the digits MLP 64-32-10 (float64) on 512 training
    images, full batch, 60 steps of RiemannianSGD with the damped Fisher metric (δ = 0.05, lr 0.2, refresh 5) (damping referenced to the pull-back of the θ identity in ψ, so
    that M_ψ = Jᵀ M_θ J: a tensor), of AdamW and of SGD, each with the same hyperparameters in both coordinates.
    Recorded per method: both training-loss curves and the largest gap |L_ψ(t) − L_θ(t)| / L_θ(0)."""
    import torch

    import curvdist as cd
    from curvdist import zoo
    from curvdist.geometry.reparam import ntk
    from curvdist.optim import RiemannianSGD

    torch.set_num_threads(args.threads)
    X, y = zoo.digits(split="train", n=512)
    X = X.double()
    data = (X, y)

    def model_in(coords: str) -> torch.nn.Module:
        net = zoo.mlp(64, (32,), 10, seed=0, dtype="float64")
        if coords == "theta":
            return net
        return cd.reparametrize(cd.Problem(net, "cross_entropy", data), ntk(sigma_w=1.0, sigma_b=0.1)).model

    def optimizer(method: str, model: torch.nn.Module, coords: str) -> torch.optim.Optimizer:
        if method == "riemannian_sgd":
            metric: Any = ((lambda p: cd.metric(p, "fisher", 0.05, damping_metric=cd.metric(p, "pullback")))
                           if coords == "psi" else "fisher")
            return RiemannianSGD(model, "cross_entropy", data, metric=metric, lr=0.2, damping=0.05, refresh=5)
        if method == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        return torch.optim.SGD(model.parameters(), lr=0.5)

    out: dict[str, Any] = {"reparam": "ntk(sigma_w=1, sigma_b=0.1)", "steps": 60, "samples": 512,
                           "methods": {}}
    for method in ("riemannian_sgd", "adamw", "sgd"):
        curves = {}
        for coords in ("theta", "psi"):
            model = model_in(coords)
            opt = optimizer(method, model, coords)
            losses = []
            for _ in range(out["steps"]):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(X), y)
                loss.backward()
                losses.append(float(loss.detach()))
                opt.step()
            curves[coords] = losses
        gap = max(abs(a - b) for a, b in zip(curves["theta"], curves["psi"])) / curves["theta"][0]
        out["methods"][method] = {"loss_theta": curves["theta"], "loss_psi": curves["psi"],
                                  "max_relative_gap": gap, "final_theta": curves["theta"][-1],
                                  "final_psi": curves["psi"][-1]}
        print(f"{method}: max |L_psi - L_theta| / L_0 = {gap:.2e}", flush=True)
    return out


def plot_invariance(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, r), color in zip(doc["methods"].items(), ["C0", "C1", "C2"]):
        ax.plot(r["loss_theta"], color=color, label=f"{method} (θ)")
        ax.plot(r["loss_psi"], color=color, linestyle="--", label=f"{method} (ψ = NTK)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("same start, two parametrizations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["cnn", "decoder"])
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=["adamw", "rsgd_kfac", "rsgd_ekfac", "rsgd_diag", "soap", "shampoo"])
    p.add_argument("--budget", type=float, default=240.0, help="training wall seconds per run")
    p.add_argument("--grid", choices=["full", "small"], default="full")
    p.add_argument("--every", type=int, default=10, help="evaluate every this many steps")
    p.add_argument("--batch", type=int, default=16, help="decoder: windows per batch")
    p.add_argument("--corpus-mb", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(OUT / "train_benchmark.json"))
    p.add_argument("--ranks", type=int, default=1,
                   help="data-parallel DeepSpeed ZeRO-2 ranks (torchrun, gloo); adamw and rsgd_kfac only")
    p.add_argument("--invariance", action="store_true",
                   help="train in θ and in NTK coordinates ψ instead (benchmarks/results/train_invariance.json)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.invariance:
        doc = invariance(args)
        target = OUT / "train_invariance.json"
        target.write_text(json.dumps(doc, indent=1))
        plot_invariance(doc, target.with_suffix(".png"))
        return
    if args.one:
        task, method, lr = args.one.split(":")
        r = run(task, method, float(lr), args)
        if r.get("rank", 0) == 0:
            print(json.dumps(r))
        return
    out_path = Path(args.out)
    doc: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    doc["setup" if args.ranks == 1 else f"setup_{args.ranks}ranks"] = {k: v for k, v in vars(args).items()
                                                                       if k not in ("one", "out")}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for task in args.tasks:
        for method in args.methods:
            for lr in (SMALL[method] if args.grid == "small" else GRIDS[task][method]):
                print(f"[{time.strftime('%H:%M:%S')}] {task} {method} lr={lr:g} (load {os.getloadavg()[0]:.1f})",
                      flush=True)
                cmd = [sys.executable, __file__, "--one", f"{task}:{method}:{lr}"] + sys.argv[1:]
                name = method
                if args.ranks > 1:
                    launcher = str(Path(sys.executable).parent / "torchrun")
                    cmd = [launcher, "--nproc_per_node", str(args.ranks), "--master_addr", "127.0.0.1",
                           "--master_port", str(29600 + int(time.time()) % 300)] + cmd[1:]
                    name = f"{method}@{args.ranks}ranks"
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
                doc["runs"] = [r for r in doc["runs"]
                               if (r.get("task"), r.get("method"), r.get("lr")) != (task, name, lr)]
                if proc.returncode:
                    doc["runs"].append({"task": task, "method": name, "lr": lr, "error": proc.stderr[-2000:]})
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    r["load"] = os.getloadavg()
                    doc["runs"].append(r)
                    print("    ->", r["steps"], "steps, best val", min(p["val"] for p in r["curve"]), flush=True)
                doc["summary"] = summarize(doc["runs"])
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(doc, indent=1))
    plot(doc["runs"], out_path.with_suffix(".png"))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
