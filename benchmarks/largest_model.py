"""Benchmark: the largest model this machine can train, and curvature on it (issue 20, item 5).

GPT-2 large's sizes (``curvdist.zoo.hf_causal_lm``: n_embd 1280, 36 layers, 20 heads, vocab 50257, head tied to the
token embedding: 774,030,080 parameters, float32, random seeded weights) in ``--stages`` Ray pipeline stages
(``cd.ray_backend``; stages built as meta skeletons that fetch only their own parameters), ``--batch`` sequences of
``--tokens`` tokens from ``curvdist.zoo.markov_corpus``, ``--micro`` micro-batches. Stage snapshots are off (each
would write the stage's vectors, GBs, to disk).

Measured, each with every process's peak resident memory (the kernel's high-water mark, reset at the start of the
window), in this order:

1. a training step through the stages (``PipelineTrainer``, SGD with learning rate 1e-30, so the parameters stay
   those of the queries): the reference peak;
2. the top eigenvalue of the Hessian (``--curvature ggn``: of the GGN), ``cd.eigs(k=1, tol=--tol,
   max_basis=--max-basis)`` (thick restart: at most that many Lanczos vectors on the stages);
3. a Hutch++ trace of the same curvature with ``--trace-matvecs`` products (default 4: one sketch direction, two
   residual probes, so the trace has a standard error).

A pipelined Hessian product (reverse over reverse on each stage) holds, per stage, the parameters, v, the output and
the double backward's graph; each primal parameter gradient is freed as it is made and each contribution to the
output added as it is made (curvdist.operators.cotangents). Earlier (forward over reverse, with primal and tangent
gradients side by side, v's tangents copied, basis rows resident) Ray's memory monitor killed a stage on 24 GB.
``--basis-on-disk``: the stages keep their Lanczos basis rows in memory-mapped files (``basis_on_disk``), page cache
the system can reclaim, out of the stages' resident memory between passes.

The goal: each stage's peak during a query ≤ 1.5× its peak during the training step. Writes
benchmarks/results/largest_model.json.

    python benchmarks/largest_model.py [--stages 4] [--batch 2] [--tokens 64] [--max-basis 4] [--tol 1e-2]

The stored runs: ``--curvature ggn --queries eig,trace --basis-on-disk --max-basis 3 --maxiter 12``
(``largest_model.json``), the trace alone, ``--curvature ggn --queries trace`` (``largest_model_trace.json``), and
the Hessian, ``--curvature hessian --queries eig,trace --basis-on-disk --max-basis 3 --maxiter 12``
(``largest_model_hessian.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "largest_model.json"
GPT2_LARGE = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1280, "n_layer": 36,
              "n_head": 20, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def peaks(records: list[dict[str, Any]]) -> dict[str, float]:
    return {r["role"]: r["peak_rss_mb"] for r in records}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--max-basis", type=int, default=4)
    p.add_argument("--maxiter", type=int, default=40)
    p.add_argument("--trace-matvecs", type=int, default=4)
    p.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"],
                   help="the curvature of the eigenvalue and the trace")
    p.add_argument("--queries", type=lambda t: t.split(","), default=["eig", "trace"],
                   help="which of eig,trace to run after the training step (default both, in that order)")
    p.add_argument("--basis-on-disk", action="store_true",
                   help="the stages keep their Lanczos basis rows in memory-mapped files (page cache)")
    p.add_argument("--model-config", default="", help="JSON overriding GPT-2 large's sizes (smoke tests)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    import curvdist as cd
    from curvdist.distributed.pipeline_train import PipelineTrainer

    config = json.loads(args.model_config) if args.model_config else GPT2_LARGE
    spec = cd.ProblemSpec("curvdist.zoo:hf_causal_lm", "curvdist.zoo:markov_corpus", "causal_lm",
                          model_kwargs={"config": config, "seed": 0},
                          data_kwargs={"n": args.batch, "vocab_size": config["vocab_size"],
                                       "max_length": args.tokens, "min_length": args.tokens, "seed": 0},
                          batch_size=args.batch, dtype="float32")
    recorded = {k: v for k, v in vars(args).items() if k != "out"}  # no path of the machine in the results
    res: dict[str, Any] = {"args": recorded, "load_start": os.getloadavg(), "model": config}
    t0 = time.perf_counter()
    with cd.ray_backend(workers=args.stages, num_cpus=max(args.stages, 2)) as backend:
        staged = backend.pipeline(spec, stages=args.stages, micro_batches=args.micro, snapshots=False,
                                  basis_on_disk=args.basis_on_disk)
        pool = staged.pool
        res["build_s"] = time.perf_counter() - t0
        res["parameters"] = staged.dim
        res["stages"] = [{"owned": i["dim"], "held": i["held"], "built": i["built"]} for i in pool.infos]
        res["held_over_model"] = [i["held"] / staged.dim for i in pool.infos]
        print(f"built in {res['build_s']:.0f} s: {res['stages']}", flush=True)

        staged.memory_reset()
        trainer = PipelineTrainer(staged, "sgd", lr=1e-30)
        t0 = time.perf_counter()
        loss = trainer.step(0)
        res["train_step"] = {"seconds": time.perf_counter() - t0, "loss": loss,
                             "memory": staged.memory_records()}
        print(f"training step {res['train_step']['seconds']:.0f} s", flush=True)

        try:
            if "eig" in args.queries:
                H = cd.operator(staged, args.curvature)
                staged.memory_reset()
                t0 = time.perf_counter()
                eig = cd.eigs(H, k=1, tol=args.tol, maxiter=args.maxiter, max_basis=args.max_basis, seed=0)
                res["eig"] = {"value": eig.value[0], "converged": eig.converged, "matvecs": eig.matvecs,
                              "residual": eig.info["residuals"][0], "seconds": time.perf_counter() - t0,
                              "memory": staged.memory_records()}
                print(f"eig {res['eig']['value']:.4g} in {res['eig']['seconds']:.0f} s ({eig.matvecs} products)",
                      flush=True)
            if "trace" in args.queries:
                staged.memory_reset()
                t0 = time.perf_counter()
                tr = cd.trace(cd.operator(staged, args.curvature), method="hutchpp", matvecs=args.trace_matvecs,
                              seed=0)
                res["trace"] = {"value": tr.value, "stderr": tr.stderr, "matvecs": args.trace_matvecs,
                                "seconds": time.perf_counter() - t0, "memory": staged.memory_records()}
                print(f"trace {tr.value:.4g} in {res['trace']['seconds']:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a stage killed for memory: what was measured is kept
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
            print(res["error"], flush=True)

    train = peaks(res["train_step"]["memory"])
    ratios = {}
    for query in [q for q in ("eig", "trace") if q in res]:
        q = peaks(res[query]["memory"])
        ratios[query] = {role: q[role] / train[role] for role in q if role.startswith("stage") and role in train}
    res["peak_over_train_step"] = ratios
    res["goal_peak_le_1.5x_train_step"] = bool(ratios) and all(v <= 1.5 for r in ratios.values() for v in r.values())
    res["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps({k: res.get(k) for k in ("parameters", "held_over_model", "peak_over_train_step",
                                              "goal_peak_le_1.5x_train_step", "error")}, indent=1))


if __name__ == "__main__":
    main()
