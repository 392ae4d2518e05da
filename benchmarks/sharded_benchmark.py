"""Benchmark: model-sharded curvature — the local backend against Ray pipeline mode (S stages, M micro-batches) on
GPT-2-style decoders, and what each process holds and peaks at.

Models: ``curvdist.zoo.hf_causal_lm`` with GPT-2 small's sizes (124,439,808 parameters, head tied to the token
embedding) or GPT-2 medium's (``--model gpt2_medium``: n_embd 1024, 24 layers, 16 heads; 354,823,168
parameters), random seeded weights, float32. Data: ``curvdist.zoo.markov_corpus`` (seed 0), ``--batch`` sequences of
``--tokens`` tokens, one batch. Loss: causal LM (mean over the predicted tokens).

Each configuration runs in a fresh process (``--one NAME``): ``local`` (``spec.build()``, torch with ``--threads``
threads), or ``pipeline_SxM`` (``cd.ray_backend`` with an embedded Ray instance; ``backend.pipeline(spec, S, M)``,
with stage snapshots on as by default; ``pipeline_SxM_nosnap`` with them off;
every stage actor has one CPU and one torch thread, so S = 2 uses the same two cores as local). For each: build
time; GGN- and Hessian-vector product time (one warm-up, then ``--repeats`` timed, best reported); the top GGN
eigenvalue by ``cd.eigs`` (k = 1, ``--tol``, at most ``--max-steps`` products) with its wall time; and
``problem.memory_records()`` around the solve — per process its role, the parameters it holds and its peak
resident memory (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` at the start of the
window). Pipeline runs also report the stage utilization (busy time / product wall time) and the tied weight.

ZeRO-3 curvature without gathering (issue 12, item 4) is not implemented; its rows say so.

    python benchmarks/sharded_benchmark.py [--model gpt2_small|gpt2_medium] [--batch 2] [--tokens 64]
        [--configs local,pipeline_2x1,pipeline_2x4,pipeline_4x1,pipeline_4x4] [--device cpu|cuda]

Writes benchmarks/results/sharded_benchmark_<model>.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "gpt2_small": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                   "n_head": 12},
    "gpt2_medium": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1024, "n_layer": 24,
                    "n_head": 16},
}


def make_spec(args: argparse.Namespace) -> Any:
    from curvdist.problem.spec import ProblemSpec

    config = json.loads(args.model_config) if args.model_config else MODELS[args.model]
    return ProblemSpec("curvdist.zoo:hf_causal_lm", "curvdist.zoo:markov_corpus", "causal_lm",
                       model_kwargs={"config": config, "seed": 0},
                       data_kwargs={"n": args.batch, "vocab_size": config["vocab_size"], "max_length": args.tokens,
                                    "min_length": args.tokens, "seed": 0},
                       batch_size=args.batch, dtype="float32")


def timed(fn: Any, repeats: int) -> tuple[float, list[float]]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def measure(problem: Any, args: argparse.Namespace, space: Any = None) -> dict[str, Any]:
    import torch

    import curvdist as cd

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    v = torch.randn(problem.dim, generator=g, dtype=torch.float32)
    if space is not None:
        v = space.from_tensor(v)
    for kind in ("ggn", "hessian"):
        # locally the fastest Hessian mode on this model (lm_benchmark.py: reverse-over-reverse); the stages
        # run forward-over-reverse, stage by stage
        op = cd.operator(problem, kind, **({"mode": "reverse_over_reverse"} if kind == "hessian" and space is None
                                           else {}))
        best, times = timed(lambda: op.apply_vector(v) if space is not None else op @ v, args.repeats)
        out[f"{kind}_product_s"] = best
        out[f"{kind}_product_times_s"] = times
        info = getattr(op, "product_info", None)
        if callable(info):
            out[f"{kind}_product_info"] = info()
    op = cd.operator(problem, "ggn")
    problem.memory_reset()
    t0 = time.perf_counter()
    r = cd.eigs(op, k=1, tol=args.tol, maxiter=args.max_steps, seed=0)
    out["eig"] = {"value": float(r.value[0]), "matvecs": r.matvecs, "seconds": time.perf_counter() - t0,
                  "converged": bool(r.info.get("converged", True)), "tol": args.tol}
    out["memory"] = problem.memory_records()
    info = getattr(op, "product_info", None)
    if callable(info):
        out["eig"]["schedule"] = info()
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import curvdist as cd

    torch.set_num_threads(args.threads)
    spec = make_spec(args)
    name = args.one
    t0 = time.perf_counter()
    res: dict[str, Any] = {"config": name, "load_start": os.getloadavg()}
    if name == "local":
        problem = spec.build(device=args.device)
        res["build_s"] = time.perf_counter() - t0
        res["parameters"] = problem.dim
        res.update(measure(problem, args))
    elif name.startswith("pipeline_"):
        shape, _, option = name[len("pipeline_"):].partition("_")
        stages, micro = (int(x) for x in shape.split("x"))
        with cd.ray_backend(workers=stages, num_cpus=max(stages, 2)) as backend:
            staged = backend.pipeline(spec, stages=stages, micro_batches=micro, snapshots=option != "nosnap")
            res["build_s"] = time.perf_counter() - t0
            pool = staged.pool
            res["parameters"] = staged.dim
            res["stages"] = [{"owned": i["dim"], "held": i["held"], "tied_from": i["foreign"]} for i in pool.infos]
            res["held_over_model"] = [i["held"] / staged.dim for i in pool.infos]
            res.update(measure(staged, args, pool.space))
    elif name == "zero3_2ranks":
        res["skipped"] = ("ZeRO-3 curvature without gathering (finite-difference products on the engine's "
                          "partitions) is not implemented yet; the DeepSpeed monitor still gathers the model")
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    res["load_end"] = os.getloadavg()
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    local = results.get("local", {})
    s: dict[str, Any] = {}
    for name, r in results.items():
        if "ggn_product_s" not in r:
            continue
        row = {"ggn_product_s": r["ggn_product_s"], "hessian_product_s": r["hessian_product_s"],
               "eig_s": r["eig"]["seconds"], "eig_value": r["eig"]["value"],
               "peak_rss_mb": {m["role"]: m["peak_rss_mb"] for m in r["memory"]}}
        if "ggn_product_s" in local and name != "local":
            row["ggn_over_local"] = r["ggn_product_s"] / local["ggn_product_s"]
            row["hessian_over_local"] = r["hessian_product_s"] / local["hessian_product_s"]
            row["eig_value_rel_diff"] = abs(r["eig"]["value"] - local["eig"]["value"]) / abs(local["eig"]["value"])
        if "held_over_model" in r:
            row["max_held_over_model"] = max(r["held_over_model"])
            row["goal_held_le_1.2_over_S"] = max(r["held_over_model"]) <= 1.2 / len(r["held_over_model"])
            row["utilization"] = r.get("ggn_product_info", {}).get("utilization")
        s[name] = row
    if "pipeline_2x4" in s and "ggn_over_local" in s["pipeline_2x4"]:
        s["goal_pipeline_2x4_le_1.3x_local"] = s["pipeline_2x4"]["ggn_over_local"] <= 1.3
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_small", choices=sorted(MODELS))
    p.add_argument("--model-config", default="", help="JSON model config overriding --model (smoke tests)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--configs", type=lambda s: s.split(","),
                   default=["local", "pipeline_2x1", "pipeline_2x4", "pipeline_2x4_nosnap", "pipeline_4x1",
                            "pipeline_4x4", "zero3_2ranks"])
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--out", default="")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(child(args)))
        return
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"sharded_benchmark_{args.model}.json")
    doc: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc.setdefault("results", {})
    doc["setup"] = {k: v for k, v in vars(args).items() if k not in ("one", "out")}
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in args.configs:
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {os.getloadavg()[0]:.1f})", flush=True)
        cmd = [sys.executable, __file__, "--one", name] + [a for a in sys.argv[1:] if a != "--one"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
            if proc.returncode:
                doc["results"][name] = {"error": proc.stderr[-3000:]}
            else:
                doc["results"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            doc["results"][name] = {"error": f"timed out after {args.timeout} s"}
        r = doc["results"][name]
        print("    ->", {k: r[k] for k in ("ggn_product_s", "hessian_product_s", "error", "skipped") if k in r},
              flush=True)
        doc["summary"] = summarize(doc["results"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
