"""Benchmark: curvdist vs curvlinops + scipy eigsh vs PyHessian, and the estimators' error vs budget.

One run, same models, same data, float64:
  1. top-5 Hessian eigenvalues of the digits MLP (64-16-10 tanh, 1,210 parameters) and the digits CNN at tolerance
     1e-8: wall time, matvecs, max relative error against the dense eigenvalues;
  2. HVP time / gradient time for curvdist;
  3. trace error vs matvec budget for Hutchinson, Hutch++ and XTrace (mean over seeds).
Writes benchmarks/results/eigs_benchmark.json and .png.

    python benchmarks/eigs_benchmark.py [--repeats 3] [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import curvdist as cd
from curvdist import zoo
from curvdist.solvers import TorchSpace
from curvdist.solvers.trace import TRACE_METHODS

OUT = Path(__file__).parent / "results"


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    X, y = zoo.digits(split="train", dtype="float64")
    Xi, _ = zoo.digits(split="train", shape="image", dtype="float64")
    return {
        "mlp_64-16-10": (zoo.mlp(64, (16,), 10, "tanh", seed=0, dtype="float64").eval(), X, y),
        "cnn_4-8": (zoo.cnn((4, 8), seed=0, dtype="float64").eval(), Xi, y),
    }


def trained(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 200) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def dense_eigvals(problem: cd.Problem) -> np.ndarray:
    H = cd.operator(problem, "hessian").to_dense(max_dim=20000)
    return np.sort(np.linalg.eigvalsh(H.numpy()))[::-1]


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_curvdist(problem, k, tol, repeats):
    op = cd.operator(problem, "hessian", check_determinism=False)
    secs, r = timed(lambda: cd.eigs(op, k=k, tol=tol, seed=0), repeats)
    return secs, np.asarray(r.value), r.matvecs


def bench_curvlinops(model, X, y, k, tol, repeats):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = list(model.parameters())
    op = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    A = op.to_scipy()
    count = [0]

    def mv(x):
        count[0] += 1
        return A @ x

    L = LinearOperator(A.shape, matvec=mv, dtype=np.float64)

    def run():
        count[0] = 0
        return eigsh(L, k=k, which="LA", tol=tol, return_eigenvectors=False)

    secs, vals = timed(run, repeats)
    return secs, np.sort(vals)[::-1], count[0]


def bench_pyhessian(model, X, y, k, tol, repeats):
    from pyhessian import hessian

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    try:
        torch.manual_seed(0)
        secs, out = timed(lambda: hessian(model, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
                          .eigenvalues(maxIter=1000, tol=tol, top_n=k)[0], repeats)
    finally:
        torch.set_default_dtype(default)
    return secs, np.asarray(out), None


def hvp_over_grad(problem, repeats: int = 20):
    op = cd.operator(problem, "hessian", check_determinism=False)
    v = problem.unflatten(torch.randn(problem.dim, dtype=problem.dtype))
    t_h, _ = timed(lambda: op.matvec_params(v), repeats)
    t_g, _ = timed(lambda: problem.gradient(), repeats)
    return t_h, t_g


def trace_curves(problem, budgets, seeds):
    op = cd.operator(problem, "hessian", check_determinism=False)
    true = float(torch.diagonal(op.to_dense(max_dim=20000)).sum())
    space = TorchSpace(op.dim, op.dtype)
    apply = lambda v: problem.flatten(op.matvec_params(problem.unflatten(v)))  # noqa: E731
    curves = {}
    for name, fn in TRACE_METHODS.items():
        curves[name] = [float(np.mean([abs(fn(apply, space, b, seed=s).value - true) / abs(true)
                                       for s in range(seeds)])) for b in budgets]
    return true, curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-8)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.processor()},
              "k": args.k, "tol": args.tol, "eigs": {}, "hvp_over_grad": {}, "trace": {}}
    problems = {}
    for name, (model, X, y) in models().items():
        model = trained(model, X, y)
        problem = problems[name] = cd.Problem(model, "cross_entropy", (X, y))
        exact = dense_eigvals(problem)[: args.k]
        rows = {}
        for lib, fn in (("curvdist", lambda: bench_curvdist(problem, args.k, args.tol, args.repeats)),
                        ("curvlinops+eigsh", lambda: bench_curvlinops(model, X, y, args.k, args.tol, args.repeats)),
                        ("pyhessian", lambda: bench_pyhessian(model, X, y, args.k, args.tol, args.repeats))):
            try:
                secs, vals, mv = fn()
                err = float(np.max(np.abs(vals - exact) / np.abs(exact)))
                rows[lib] = {"seconds": secs, "matvecs": mv, "max_rel_error": err, "eigenvalues": vals.tolist()}
            except Exception as e:  # a peer failing is a result too
                rows[lib] = {"error": f"{type(e).__name__}: {e}"}
            print(name, lib, rows[lib])
        rows["speedup_vs_curvlinops"] = rows["curvlinops+eigsh"].get("seconds", float("nan")) / \
            rows["curvdist"]["seconds"]
        report["eigs"][name] = {"params": problem.dim, "exact": exact.tolist(), **rows}
        t_h, t_g = hvp_over_grad(problem)
        report["hvp_over_grad"][name] = {"hvp_seconds": t_h, "grad_seconds": t_g, "ratio": t_h / t_g}
        print(name, "HVP/grad", t_h / t_g)
    budgets = [12, 24, 48, 96, 192, 384]
    true, curves = trace_curves(problems["mlp_64-16-10"], budgets, args.seeds)
    report["trace"] = {"model": "mlp_64-16-10", "true": true, "budgets": budgets, "mean_rel_error": curves,
                       "seeds": args.seeds}
    print("trace", curves)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eigs_benchmark.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "eigs_benchmark.png")
    print("wrote", OUT / "eigs_benchmark.json")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["eigs"])
    libs = ["curvdist", "curvlinops+eigsh", "pyhessian"]
    width = 0.25
    for i, lib in enumerate(libs):
        secs = [report["eigs"][n][lib].get("seconds", np.nan) for n in names]
        a.bar(np.arange(len(names)) + i * width, secs, width, label=lib)
    a.set_xticks(np.arange(len(names)) + width, names)
    a.set_ylabel(f"seconds, top-{report['k']} Hessian eigenvalues (tol {report['tol']:g})")
    a.legend()
    for name, errs in report["trace"]["mean_rel_error"].items():
        b.loglog(report["trace"]["budgets"], errs, "o-", label=name)
    b.set_xlabel("matvecs")
    b.set_ylabel("mean relative trace error")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
