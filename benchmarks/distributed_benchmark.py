"""Benchmark: one GGN- and Hessian-vector product on a ≥1M-parameter MLP, local vs Ray data mode (1, 2 workers)
vs Ray pipeline mode (2 stages), and Ray's overhead per product.

Overhead of data mode = wall time of the distributed product − the slowest worker's compute time for its shard
(timed inside the worker); for pipeline mode, wall time − the summed stage compute of one product measured
locally. Writes benchmarks/results/distributed_benchmark.json.

    python benchmarks/distributed_benchmark.py [--repeats 5] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import curvdist as cd
from curvdist.operators.sharded import matvec_sum
from curvdist.problem.spec import ProblemSpec

OUT = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=1024)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    h = args.hidden
    spec = ProblemSpec(model_factory="curvdist.zoo:mlp",
                       model_kwargs={"in_features": 64, "hidden": [h, h], "out_features": 10, "dtype": "float32"},
                       data_factory="curvdist.zoo:digits", data_kwargs={"n": args.samples, "dtype": "float32"},
                       batch_size=256, loss="cross_entropy", dtype="float32")
    local = spec.build()
    report = {"params": local.dim, "samples": local.num_samples, "dtype": "float32", "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "products": {}}
    print("parameters", local.dim)
    v = torch.randn(local.dim, generator=torch.Generator().manual_seed(0))
    for kind in ("ggn", "hessian"):
        op = cd.operator(local, kind, check_determinism=False)
        report["products"].setdefault(kind, {})["local"] = timed(lambda: op.apply_vector(v), args.repeats)
    with cd.ray_backend(workers=2) as backend:
        import ray

        for workers in (1, 2):
            remote = backend.data_parallel(spec, workers)
            pool = remote.reducer.pool
            for kind in ("ggn", "hessian"):
                op = cd.operator(remote, kind, check_determinism=False)
                wall = timed(lambda: op.apply_vector(v), args.repeats)
                # compute time measured inside the workers (the slowest shard bounds the product)
                ref = ray.put(v)
                compute = max(ray.get([a.seconds.remote(matvec_sum, kind, {}, ref, repeats=args.repeats)
                                       for a in pool.actors]))
                report["products"][kind][f"data_{workers}"] = {"wall": wall, "slowest_worker_compute": compute,
                                                               "overhead": wall - compute}
            pool.shutdown()
        staged = backend.pipeline(spec, stages=2)
        space = staged.pool.space
        vs = space.from_tensor(v)
        for kind in ("ggn", "hessian"):
            op = cd.operator(staged, kind)
            wall = timed(lambda: op.apply_vector(vs), args.repeats)
            report["products"][kind]["pipeline_2"] = {"wall": wall,
                                                      "overhead_vs_local": wall - report["products"][kind]["local"]}
    for kind, row in report["products"].items():
        row["speedup_2_vs_1_workers"] = row["data_1"]["wall"] / row["data_2"]["wall"]
        row["data_2_overhead_fraction"] = row["data_2"]["overhead"] / row["data_2"]["wall"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distributed_benchmark.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
