"""Benchmark: curvdist's Lanczos against ARPACK (scipy.sparse.linalg.eigsh) at ResNet-18 size (11.2M parameters).

The operator is cheap so that the solvers' own cost shows: A = diag(λ) with λ = (10, 5, 3, u_4, …, u_d), u_i uniform
on [0, 1) (seeded), so the top eigenvalue is exactly 10. Both solvers start from the same Gaussian vector and do 30
matrix-vector products in the working dtype (float32 by default):

  * curvdist: ``curvdist.solvers.lanczos`` (full reorthogonalization, preallocated basis), top Ritz value of T_30;
  * ARPACK:   ``eigsh(k=1, which="LA", ncv=30, maxiter=1)`` (one Lanczos sweep of 30 vectors; 31 products).

Every measurement runs in a fresh subprocess. Wall time covers the solve only (operator and start vector are built
before); peak memory is the rise of the process's peak resident set during the solve (VmHWM, reset just before via
/proc/self/clear_refs; ru_maxrss where that is unavailable). Both solvers get the same thread count: ``--threads
auto`` asks curvdist's rule (free CPUs sampled from /proc/stat) once per scenario, after the co-tenant started;
``default`` leaves torch's and scipy's own counts (one thread per core: what a new user gets). Wall time on a shared
machine depends on its other load, so the CPU time of each solve is recorded too. Each repeat runs the two solvers
back to back (alternating which goes first); the reported ratios are medians over the repeats of the pairs' ratios,
next to each solver's best time and largest peak memory.

Scenarios: ``idle`` (whatever else the machine runs), and ``cotenant``: the same with one extra busy process
(``python -c "while True: pass"``) running for the whole scenario.

Writes benchmarks/results/lanczos_benchmark.json and .png.

    python benchmarks/lanczos_benchmark.py [--dim 11200000] [--steps 30] [--dtype float32] [--repeats 3]
                                           [--scenarios idle,cotenant] [--threads auto,default] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from curvdist.resources import reset_peak

OUT = Path(__file__).parent / "results"
TOP = (10.0, 5.0, 3.0)
GOAL = 1.5


# ------------------------------------------------------------------------------------------------ the worker side
def _rss() -> tuple[int, int]:
    """(current, peak) resident set in bytes from /proc/self/status."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _cpu() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def problem(dim: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """λ (top three 10, 5, 3; the rest uniform on [0, 1)) and the Gaussian start vector, both in ``dtype``."""
    rng = np.random.default_rng(seed)
    lam = rng.random(dim, dtype=np.float32 if dtype == "float32" else np.float64)
    lam[: len(TOP)] = TOP
    v0 = np.random.default_rng(seed + 1).standard_normal(dim, dtype=lam.dtype)
    return lam, v0


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import curvdist as cd

    if args.threads == "default":  # the libraries' own thread counts, as a new user gets them
        threads = torch.get_num_threads()
    else:
        threads = cd.set_threads(args.threads).threads  # torch's pools and numpy/scipy's BLAS alike
    lam, v0 = problem(args.dim, args.dtype, args.seed)
    out: dict[str, Any] = {"solver": args.worker, "threads": threads, "device": "cpu"}
    if args.worker == "curvdist":
        from curvdist.solvers import TorchSpace, lanczos

        device = torch.device(args.device)
        L, start = torch.from_numpy(lam).to(device), torch.from_numpy(v0).to(device)
        space = TorchSpace(args.dim, L.dtype, device)
        out["device"] = str(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_gpu = torch.cuda.memory_allocated()
        base, _ = _rss()
        hwm = reset_peak()
        base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        c0, t0 = _cpu(), time.perf_counter()
        state = lanczos(lambda v: L * v, space, start, args.steps)
        theta, _ = state.tridiagonal_eigh()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, _cpu() - c0
        out["matvecs"] = state.matvecs
        if device.type == "cuda":
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated() - base_gpu)
        if args.orthogonality:  # max |QᵀQ − I| of the basis, after the measurement
            G = np.stack([space.dots(state.basis, q) for q in state.basis])
            out["orthogonality"] = float(np.abs(G - np.eye(len(G))).max())
    else:
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        count = [0]

        def mv(v: np.ndarray) -> np.ndarray:
            count[0] += 1
            return lam * v.reshape(-1)

        A = LinearOperator((args.dim, args.dim), matvec=mv, dtype=lam.dtype)
        base, _ = _rss()
        hwm = reset_peak()
        base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        c0, t0 = _cpu(), time.perf_counter()
        try:
            theta = eigsh(A, k=1, which="LA", ncv=args.steps, maxiter=1, v0=v0, tol=0, return_eigenvectors=False)
            out["converged"] = True
        except ArpackNoConvergence as e:  # one sweep is what is measured; the Ritz value comes with the exception
            theta = e.eigenvalues
            out["converged"] = False
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, _cpu() - c0
        out["matvecs"] = count[0]
    _, peak = _rss()
    out["peak_rss_bytes"] = int(peak - base) if hwm else \
        int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_max)
    out["peak_method"] = "VmHWM" if hwm else "ru_maxrss"
    out["top_eigenvalue"] = float(np.max(theta))
    out["abs_error"] = abs(out["top_eigenvalue"] - TOP[0])
    return out


# ------------------------------------------------------------------------------------------------ the driver side
def measure(solver: str, args: argparse.Namespace, threads: int | str, orthogonality: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", solver, "--dim", str(args.dim), "--steps", str(args.steps),
           "--dtype", args.dtype, "--threads", str(threads), "--seed", str(args.seed), "--device", args.device]
    if orthogonality:
        cmd.append("--orthogonality")
    env = dict(os.environ, CURVDIST_THREADS="")  # the thread count is passed explicitly
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{solver} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenario(name: str, threads: str, args: argparse.Namespace) -> dict[str, Any]:
    from curvdist.runtime import thread_choice

    busy = None
    if name == "cotenant":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    try:
        if threads == "default":
            count: int | str = "default"
            reason = "the libraries' defaults (torch: one thread per core; scipy's BLAS likewise)"
        else:
            choice = thread_choice(args.dim, threads)
            count, reason = choice.threads, choice.reason
        runs: dict[str, list[dict[str, Any]]] = {"curvdist": [], "arpack": []}
        for r in range(args.repeats):
            # interleaved, the order alternating, so drifting load hits both alike
            for solver in ("curvdist", "arpack") if r % 2 == 0 else ("arpack", "curvdist"):
                res = measure(solver, args, count, orthogonality=(solver == "curvdist" and r == 0))
                res["loadavg"] = os.getloadavg()[0]
                runs[solver].append(res)
                print(f"  [{name}] {solver:8s} {res['seconds']:7.2f} s (cpu {res['cpu_seconds']:6.2f} s)  "
                      f"{res['peak_rss_bytes'] / 2**30:5.2f} GiB  "
                      f"θ_max={res['top_eigenvalue']:.7f}  matvecs={res['matvecs']}  threads={res['threads']}",
                      flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    summary: dict[str, Any] = {"scenario": name, "threads_requested": threads,
                               "threads": runs["curvdist"][0]["threads"], "thread_reason": reason, "runs": runs}
    for solver, rs in runs.items():
        summary[solver] = {"seconds": min(r["seconds"] for r in rs), "cpu_seconds": min(r["cpu_seconds"] for r in rs),
                           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                           "top_eigenvalue": rs[0]["top_eigenvalue"], "abs_error": rs[0]["abs_error"],
                           "matvecs": rs[0]["matvecs"]}
        if "orthogonality" in rs[0]:
            summary[solver]["orthogonality"] = rs[0]["orthogonality"]
    # ratios of each repeat's pair of back-to-back runs, then their median: robust to load that drifts between pairs
    pairs = list(zip(runs["curvdist"], runs["arpack"]))
    summary["time_ratios"] = [c["seconds"] / a["seconds"] for c, a in pairs]
    summary["cpu_time_ratios"] = [c["cpu_seconds"] / a["cpu_seconds"] for c, a in pairs]
    summary["time_ratio"] = float(np.median(summary["time_ratios"]))
    summary["cpu_time_ratio"] = float(np.median(summary["cpu_time_ratios"]))
    summary["memory_ratio"] = summary["curvdist"]["peak_rss_bytes"] / summary["arpack"]["peak_rss_bytes"]
    summary["within_goal"] = bool(summary["time_ratio"] <= GOAL and summary["memory_ratio"] <= GOAL)
    return summary


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in [(axes[0], "seconds", 1.0, "wall time [s]"),
                                  (axes[1], "peak_rss_bytes", 2**30, "peak memory above baseline [GiB]")]:
        x = np.arange(len(names))
        for i, (solver, color) in enumerate([("curvdist", "tab:blue"), ("arpack", "tab:gray")]):
            vals = [report["scenarios"][n][solver][key] / scale for n in names]
            bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=solver if solver == "curvdist" else "ARPACK",
                          color=color)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ratio_key = "time_ratio" if key == "seconds" else "memory_ratio"
        ax.set_xticks(x, [f"{report['scenarios'][n]['scenario']}\n{report['scenarios'][n]['threads']} thr "
                          f"({report['scenarios'][n]['threads_requested']})\nratio "
                          f"{report['scenarios'][n][ratio_key]:.2f}x" for n in names], fontsize=8)
        ax.set_ylim(0, 1.15 * ax.get_ylim()[1])
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Lanczos, {report['steps']} steps, d = {report['dim']:,} ({report['dtype']}), top eigenvalue "
                 f"of a diagonal operator; ratio = curvdist / ARPACK (goal ≤ {GOAL}x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=11_200_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scenarios", default="idle,cotenant", help="comma-separated subset of idle,cotenant")
    ap.add_argument("--threads", default="auto,default",
                    help="comma-separated thread settings, each measured in every scenario: 'auto' (curvdist's rule, "
                         "sampled per scenario), 'default' (the libraries' defaults) or an integer")
    ap.add_argument("--device", default="cpu", help="device of curvdist's vectors (ARPACK always runs on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "lanczos_benchmark.json")
    ap.add_argument("--worker", choices=["curvdist", "arpack"], help=argparse.SUPPRESS)
    ap.add_argument("--orthogonality", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not names or any(n not in ("idle", "cotenant") for n in names):
        ap.error(f"--scenarios must name idle and/or cotenant, got {args.scenarios!r}")
    import scipy
    import torch

    report: dict[str, Any] = {
        "dim": args.dim, "steps": args.steps, "dtype": args.dtype, "device": args.device, "seed": args.seed,
        "operator": "diag(λ), λ = (10, 5, 3, U[0,1) …); exact top eigenvalue 10",
        "arpack_call": f"eigsh(k=1, which='LA', ncv={args.steps}, maxiter=1, tol=0)",
        "goal": f"curvdist ≤ {GOAL}x ARPACK in time and peak memory",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "scipy": scipy.__version__,
                    "numpy": np.__version__, "cpus": os.cpu_count(), "processor": platform.processor()},
        "scenarios": {}}
    settings = [t.strip() for t in str(args.threads).split(",") if t.strip()]
    for n in names:
        for t in settings:
            key = n if len(settings) == 1 else f"{n}, threads={t}"
            print(f"scenario {key}", flush=True)
            report["scenarios"][key] = s = scenario(n, t, args)
            print(f"  -> time ratio {s['time_ratio']:.2f}x (cpu {s['cpu_time_ratio']:.2f}x), memory ratio "
                  f"{s['memory_ratio']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print("wrote", args.out, "and", args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
