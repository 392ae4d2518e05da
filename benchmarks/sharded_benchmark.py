"""Benchmark: model-sharded curvature — the local backend against Ray pipeline mode (S stages, M micro-batches) on
GPT-2-style decoders, and what each process holds and peaks at.

Models: ``curvdist.zoo.hf_causal_lm`` with GPT-2 small's sizes (124,439,808 parameters, head tied to the token
embedding) or GPT-2 medium's (``--model gpt2_medium``: n_embd 1024, 24 layers, 16 heads; 354,823,168
parameters), random seeded weights, float32. Data: ``curvdist.zoo.markov_corpus`` (seed 0), ``--batch`` sequences of
``--tokens`` tokens, one batch. Loss: causal LM (mean over the predicted tokens).

Each configuration runs in a fresh process (``--one NAME``): ``local`` (``spec.build()``, torch with ``--threads``
threads), or ``pipeline_SxM`` (``cd.ray_backend`` with an embedded Ray instance; ``backend.pipeline(spec, S, M)``,
with stage snapshots on as by default; ``pipeline_SxM_nosnap`` with them off; ``pipeline_SxM_everyK`` with a
snapshot every K products; ``pipeline_SxM_compute`` with stages cut by compute instead of held parameters,
``pipeline_SxM_time`` by the measured time of each block, ``pipeline_SxM_b7.5`` with 7 blocks on stage 0 and 5 on
stage 1; ``pipeline_SxM_tN`` with N torch threads a stage instead of one; options combine with ``-``, e.g.
``pipeline_2x4_compute-t2``; every stage actor has one CPU of the embedded instance, so S = 2 uses the same two cores
as local). For each: build time; GGN- and Hessian-vector product time (one warm-up, then ``--repeats`` timed, best
reported); the top GGN eigenvalue by ``cd.eigs`` (k = 1, ``--tol``, at most ``--max-steps`` products) with its wall
time; and ``problem.memory_records()`` around the solve — per process its role, the parameters it holds and its peak
resident memory (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` at the start of the
window). Pipeline runs also report the stage utilization (busy time / product wall time) and the tied weight; with
one thread a stage the summary adds the stages' work against local (``ggn_stage_work_over_local``: summed busy
time over the local product's time) and GPipe's floor (``ggn_gpipe_floor_over_local``: that work shared evenly
over S cores, times (M + S − 1)/M for the fill and drain): the least a product could take on those stages.

``zero3_Nranks`` (e.g. ``zero3_2ranks``): DeepSpeed ZeRO-3 on N ranks (``torchrun``; gloo on the CPU, NCCL with
``--device cuda``), the model built by the spec and partitioned by ``deepspeed.initialize`` (DeepSpeed's
default ZeRO-3 settings, or ``--zero3-config``: the buckets that fit GPT-2 medium on 24 GB are in
docs/guides/deepspeed.md), SGD, each rank one torch thread and its share of the batch; SGD with learning rate 0,
so the timed training steps leave the parameters those of the other configurations. Reported: the time of one
training step (forward, backward, step; best of ``--repeats`` after one; each rank's peak RSS over them), the
partitioned finite-difference GGN and Hessian products (:mod:`curvdist.integrations.deepspeed.finite_difference`)
in time and in training-step equivalents, the Lanczos solve, each rank's memory line (owned parameters, most
parameters held in full at once, peak RSS), and — after the timed part, on a full copy gathered for the check only
and checked in the parent process once the ranks exited — the relative error of both products against curvdist's
exact float32 products on one process (``--skip-exact``: no check, and no vectors kept for it). Products take
each its own step (Ridders' extrapolation); the top GGN eigenvalue (``--max-basis`` vectors at most) and a
Hutch++ trace (``--trace-matvecs``, same probes) are compared with the exact float32 values too. With
``--invariant`` every configuration also measures the top eigenvalue of M⁻¹GGN with the KFAC metric (damping
``--kfac-damping``): built locally, on the pipeline stages (each stage its own blocks), or on the ZeRO-3
partitions (statistics from the engine's own passes, one owner per layer), with its build time, solve time,
memory per process, and its agreement with local (or, for ZeRO-3, with exact float32 on a gathered copy).

    python benchmarks/sharded_benchmark.py [--model gpt2_small|gpt2_medium] [--batch 2] [--tokens 64]
        [--configs local,pipeline_2x1,pipeline_2x4,pipeline_4x1,pipeline_4x4] [--device cpu|cuda]

Writes benchmarks/results/sharded_benchmark_<model>.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


#: environment variables that set glibc's allocator, recorded with the results
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


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
    r = cd.eigs(op, k=1, tol=args.tol, maxiter=args.max_steps, seed=0, max_basis=args.max_basis or None)
    out["eig"] = {"value": float(r.value[0]), "matvecs": r.matvecs, "seconds": time.perf_counter() - t0,
                  "converged": bool(r.converged), "tol": args.tol,
                  "max_basis": args.max_basis or None}
    out["memory"] = problem.memory_records()
    info = getattr(op, "product_info", None)
    if callable(info):
        out["eig"]["schedule"] = info()
    if args.invariant:  # the top eigenvalue of M⁻¹GGN in the KFAC metric (pipeline: blocks built on the stages)
        problem.memory_reset()
        t0 = time.perf_counter()
        M = cd.metric(problem, "kfac", damping=args.kfac_damping)
        built = time.perf_counter() - t0
        ri = cd.eigs(op, k=1, tol=args.tol, maxiter=args.max_steps, seed=0, metric=M)
        out["kfac_eig"] = {"value": float(ri.value[0]), "matvecs": ri.matvecs, "metric_s": built,
                           "seconds": time.perf_counter() - t0, "damping": args.kfac_damping,
                           "memory": problem.memory_records()}
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
        options = set(option.split("-")) if option else set()
        with cd.ray_backend(workers=stages, num_cpus=max(stages, 2)) as backend:
            every = next((int(o[len("every"):]) for o in options if o.startswith("every")), 1)
            threads = next((int(o[1:]) for o in options if re.fullmatch(r"t\d+", o)), None)
            explicit = next(([int(x) for x in o[1:].split(".")] for o in options if re.fullmatch(r"b\d+(\.\d+)+", o)),
                            None)  # e.g. b7.5: 7 blocks on stage 0, 5 on stage 1
            balance = explicit or next((b for b in ("compute", "time") if b in options), "parameters")
            staged = backend.pipeline(spec, stages=stages, micro_batches=micro, snapshots="nosnap" not in options,
                                      snapshot_every=every, balance=balance, threads=threads)
            res["build_s"] = time.perf_counter() - t0
            pool = staged.pool
            res["parameters"] = staged.dim
            res["stages"] = [{"owned": i["dim"], "held": i["held"], "tied_from": i["foreign"]} for i in pool.infos]
            res["units"] = pool.units  # blocks per stage
            res["held_over_model"] = [i["held"] / staged.dim for i in pool.infos]
            res.update(measure(staged, args, pool.space))
    elif re.fullmatch(r"zero3_\d+ranks", name):
        import shutil
        import socket
        import tempfile

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = Path(tempfile.mkdtemp(prefix="curvdist-zero3-")) / "rank0.json"
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        ranks = name[len("zero3_"):-len("ranks")]
        cmd = [torchrun, "--nproc_per_node", ranks, "--master_addr", "127.0.0.1", "--master_port", str(port),
               __file__, "--zero3-rank", str(out)] + _without_one(sys.argv[1:])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT,
                              check=False)
        if proc.returncode and not out.exists():
            raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res.update(json.loads(out.read_text()))
        if proc.returncode:  # the measurement was written, the ranks did not finish (the invariant part)
            res["rank_error"] = proc.stderr[-2000:]
        if _exact_inputs(out).exists():
            zero3_exact(args, res, _exact_inputs(out))
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    res["load_end"] = os.getloadavg()
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def _without_one(argv: list[str]) -> list[str]:
    """The command line without ``--one NAME``."""
    i = argv.index("--one")
    return argv[:i] + argv[i + 2:]


def zero3_rank(args: argparse.Namespace) -> None:
    """One rank of ``zero3_2ranks`` (under torchrun); rank 0 writes the results to ``args.zero3_rank``."""
    import gc

    import deepspeed
    import torch
    import torch.distributed as dist

    import curvdist as cd
    from curvdist.integrations.deepspeed.finite_difference import PartitionedProblem
    from curvdist.problem.losses import make_loss
    from curvdist.resources import memory_record, release_free_memory, reset_peak

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = make_spec(args)
    batch = spec.build_data()
    batch = batch[0] if isinstance(batch, list) else batch
    ids, labels = batch["input_ids"], batch["labels"]
    per = ids.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    model = spec.build_model()
    config = {"train_batch_size": per * world, "train_micro_batch_size_per_gpu": per,
              "zero_optimization": {"stage": 3, **json.loads(args.zero3_config)}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    t0 = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config, dist_init_required=True)
    del model
    ids, labels = ids.to(engine.device), labels.to(engine.device)  # the engine's device (a GPU under NCCL)
    res: dict[str, Any] = {"ranks": world, "init_s": time.perf_counter() - t0}
    loss = make_loss("causal_lm")

    def train_step() -> None:
        out = engine(ids[mine]).logits
        engine.backward(loss.per_sample(out, labels[mine]).sum() / max(loss.count(labels[mine]), 1))
        engine.step()

    windowed = reset_peak(engine.device)
    res["train_step_s"], res["train_step_times_s"] = timed(train_step, args.repeats)
    line = memory_record(f"rank {rank}", sum(p.ds_tensor.numel() for p in engine.module.parameters()), windowed,
                         engine.device)
    lines: list[Any] = [None] * world
    dist.all_gather_object(lines, line)
    res["train_step_memory"] = lines  # each rank's peak over the warm-up and timed training steps
    problem = PartitionedProblem(engine, "causal_lm", ids[mine], labels[mine], None)
    res["parameters"] = problem.dim
    v = problem.space.random(0, "gaussian").float().double()
    products = {}
    for kind in ("ggn", "hessian"):
        op = problem.curvature_operator(kind)
        problem.memory_reset()
        # each product is kept for the check against exact products only (a vector of memory each)
        best, times = timed(lambda op=op, kind=kind: products.__setitem__(kind, op.apply_vector(v))
                            if not args.skip_exact else op.apply_vector(v), args.repeats)
        res[f"{kind}_product_s"], res[f"{kind}_product_times_s"] = best, times
        res[f"{kind}_over_train_step"] = best / res["train_step_s"]
        res[f"{kind}_product_info"] = op.product_info()
        res[f"{kind}_memory"] = problem.memory_records()
    if args.skip_exact:  # the probe is kept for the check only: a vector less during the solve
        v = None
    op = problem.curvature_operator("ggn")
    problem.memory_reset()
    t0 = time.perf_counter()
    r = cd.eigs(op, k=1, tol=args.tol, maxiter=args.max_steps, seed=0, max_basis=args.max_basis or None)
    res["eig"] = {"value": float(r.value[0]), "matvecs": r.matvecs, "seconds": time.perf_counter() - t0,
                  "converged": bool(r.converged), "tol": args.tol, "max_basis": args.max_basis,
                  "schedule": op.product_info()}
    res["memory"] = problem.memory_records()
    t0 = time.perf_counter()
    tr = cd.trace(problem.curvature_operator("ggn"), "hutchpp", args.trace_matvecs, seed=0)
    res["trace"] = {"value": float(tr.value), "matvecs": args.trace_matvecs, "seconds": time.perf_counter() - t0}
    # what was measured is written first, with (unless --skip-exact) the inputs of the check against exact products:
    # rank 0 saves the gathered parameters, the probe and the partitioned products (float32), and the check runs in
    # the parent process after both ranks exited (with a rank and its engine still alive, the exact float32 products
    # of GPT-2 small on rank 0 were OOM-killed on 24 GB); a rank killed in the invariant part below keeps them
    if not args.skip_exact:
        full_v = problem.space.to_tensor(v)
        fd = {k: problem.space.to_tensor(x).float() for k, x in products.items()}
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            copy = {n: p.detach().clone() for n, p in engine.module.named_parameters()} if rank == 0 else {}
        if rank == 0:
            torch.save({"state": copy, "v": full_v.float(), "products": fd}, _exact_inputs(args.zero3_rank))
        del full_v, fd, copy
    if rank == 0:
        Path(args.zero3_rank).write_text(json.dumps(res))
    dist.barrier()
    if args.invariant:  # after freeing the vectors above (two ranks of GPT-2 small share 24 GB)
        del products, v, r, tr, op
        gc.collect()
        release_free_memory()
        problem.memory_reset()
        t0 = time.perf_counter()
        M = cd.metric(problem, "kfac", damping=args.kfac_damping)
        built = time.perf_counter() - t0
        steps = args.invariant_max_steps or args.max_steps
        ri = cd.eigs(problem.curvature_operator("ggn"), k=1, tol=args.tol, maxiter=steps, seed=0, metric=M)
        res["kfac_eig"] = {"value": float(ri.value[0]), "matvecs": ri.matvecs, "metric_s": built,
                           "seconds": time.perf_counter() - t0, "damping": args.kfac_damping, "max_steps": steps,
                           "memory": problem.memory_records()}
        del M
        if rank == 0:
            Path(args.zero3_rank).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _exact_inputs(rank_json: str | Path) -> Path:
    return Path(rank_json).with_name("exact_inputs.pt")


def zero3_exact(args: argparse.Namespace, res: dict[str, Any], inputs: Path) -> None:
    """The ZeRO-3 run against curvdist's exact float32 products on one process (the gathered parameters saved by
    rank 0): relative errors of the products, and the one-process values of the eigenvalue, trace and KFAC rows."""
    import torch

    import curvdist as cd
    from curvdist.integrations.deepspeed.engine import torch_linear

    torch.set_num_threads(args.threads)
    saved = torch.load(inputs, weights_only=True)
    inputs.unlink()
    spec = make_spec(args)
    batch = spec.build_data()
    batch = batch[0] if isinstance(batch, list) else batch
    local = spec.build_model()
    local.load_state_dict(saved["state"], strict=False)
    v, fd = saved["v"], saved["products"]
    del saved
    with torch_linear():
        exact_problem = cd.Problem(local.eval(), "causal_lm", batch)
        for kind in ("ggn", "hessian"):
            exact = (cd.operator(exact_problem, kind, check_determinism=False) @ v).double()
            res[f"{kind}_relative_error"] = float((fd[kind].double() - exact).norm() / exact.norm())
            del exact
        exact_ggn = cd.operator(exact_problem, "ggn")
        exact_eig = cd.eigs(exact_ggn, k=1, tol=args.tol, maxiter=args.max_steps, seed=0)
        res["eig"]["exact_problem_value"] = float(exact_eig.value[0])
        res["trace"]["exact_problem_value"] = float(cd.trace(exact_ggn, "hutchpp", args.trace_matvecs,
                                                             seed=0).value)
        if "kfac_eig" in res:
            M = cd.metric(exact_problem, "kfac", damping=args.kfac_damping)
            res["kfac_eig"]["exact_problem_value"] = float(cd.eigs(exact_ggn, k=1, tol=args.tol,
                                                                   maxiter=res["kfac_eig"]["max_steps"], seed=0,
                                                                   metric=M).value[0])


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
            row["eig_step_s"] = r["eig"]["seconds"] / r["eig"]["matvecs"]
            row["eig_step_over_local"] = row["eig_step_s"] / (local["eig"]["seconds"] / local["eig"]["matvecs"])
        if "ggn_over_train_step" in r:
            row["ggn_over_train_step"] = r["ggn_over_train_step"]
            row["hessian_over_train_step"] = r["hessian_over_train_step"]
            row["goal_product_le_3_train_steps"] = max(r["ggn_over_train_step"], r["hessian_over_train_step"]) <= 3
            row["relative_error"] = {k: r.get(f"{k}_relative_error") for k in ("ggn", "hessian")}
            for key in ("eig", "trace", "kfac_eig"):
                exact = r.get(key, {}).get("exact_problem_value")
                if exact is not None:
                    row["relative_error"][f"{key}_value"] = abs(r[key]["value"] - exact) / abs(exact)
            row["goal_relative_error_le_1e-4"] = all(
                (e is not None and e <= 1e-4) for e in row["relative_error"].values())
            if "kfac_eig" in r:
                row["kfac_eig"] = {k: r["kfac_eig"][k] for k in ("value", "matvecs", "metric_s", "seconds")}
                row["kfac_eig"]["peak_rss_mb"] = {m["role"]: m["peak_rss_mb"] for m in r["kfac_eig"]["memory"]}
            row["max_gathered_over_model"] = max(m["peak_gathered_parameters"] for m in r["memory"]) / r["parameters"]
            row["owned_over_model"] = max(m["parameters"] for m in r["memory"]) / r["parameters"]
        if "kfac_eig" in r and "kfac_eig" not in row:
            row["kfac_eig"] = {k: r["kfac_eig"][k] for k in ("value", "matvecs", "metric_s", "seconds")}
            row["kfac_eig"]["peak_rss_mb"] = {m["role"]: m["peak_rss_mb"] for m in r["kfac_eig"]["memory"]}
            if "kfac_eig" in local and name != "local":
                row["kfac_eig"]["value_rel_diff_local"] = (abs(r["kfac_eig"]["value"] - local["kfac_eig"]["value"])
                                                           / abs(local["kfac_eig"]["value"]))
        if "held_over_model" in r:
            row["max_held_over_model"] = max(r["held_over_model"])
            row["goal_held_le_1.2_over_S"] = max(r["held_over_model"]) <= 1.2 / len(r["held_over_model"])
            row["utilization"] = r.get("ggn_product_info", {}).get("utilization")
            shape = re.match(r"pipeline_(\d+)x(\d+)", name)
            if (row["utilization"] and shape and "ggn_product_s" in local
                    and not re.search(r"(^|-)t\d+(-|$)", name.partition("_")[2].partition("_")[2])):
                # one thread a stage: busy time is core time. The stages' work shared evenly over S cores, with
                # GPipe's fill and drain ((S - 1) of M + S - 1 slots idle), is the least a product can take
                S, M = int(shape[1]), int(shape[2])
                work = sum(row["utilization"]) * r["ggn_product_s"]
                row["ggn_stage_work_over_local"] = work / local["ggn_product_s"]
                row["ggn_gpipe_floor_over_local"] = work / S * (M + S - 1) / M / local["ggn_product_s"]
        s[name] = row
    if "pipeline_2x4" in s and "ggn_over_local" in s["pipeline_2x4"]:
        s["goal_pipeline_2x4_le_1.3x_local"] = s["pipeline_2x4"]["ggn_over_local"] <= 1.3
    for name, row in list(s.items()):  # the goal: wall time per Lanczos step, 2 stages x 4 micro-batches
        if name.startswith("pipeline_2x4") and isinstance(row, dict) and "eig_step_over_local" in row:
            s[f"goal_{name}_lanczos_step_le_1.3x_local"] = row["eig_step_over_local"] <= 1.3
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
    p.add_argument("--max-basis", type=int, default=0,
                   help="every eigenvalue: at most this many Lanczos vectors (thick restart; 0: all)")
    p.add_argument("--configs", type=lambda s: s.split(","),
                   default=["local", "pipeline_2x1", "pipeline_2x4", "pipeline_2x4_nosnap", "pipeline_4x1",
                            "pipeline_4x4", "zero3_2ranks"])
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--zero3-config", default="{}",
                   help="zero3_2ranks: JSON of zero_optimization settings besides the stage (default: DeepSpeed's)")
    p.add_argument("--trace-matvecs", type=int, default=9, help="zero3_2ranks: Hutch++ matvecs of the GGN trace")
    p.add_argument("--invariant", action="store_true",
                   help="also the top eigenvalue of M⁻¹GGN with the KFAC metric (local; pipeline: blocks on the "
                        "stages; zero3_2ranks: on the partitions)")
    p.add_argument("--kfac-damping", type=float, default=0.1)
    p.add_argument("--invariant-max-steps", type=int, default=0,
                   help="zero3_2ranks: Lanczos steps of the KFAC-metric eigenvalue (default --max-steps)")
    p.add_argument("--skip-exact", action="store_true",
                   help="zero3_2ranks: skip the check against exact products (it gathers a full copy on rank 0)")
    p.add_argument("--out", default="")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--zero3-rank", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.zero3_rank:
        zero3_rank(args)
        return
    if args.one:
        print(json.dumps(child(args)))
        return
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"sharded_benchmark_{args.model}.json")
    doc: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc.setdefault("results", {})
    doc["setup"] = {k: v for k, v in vars(args).items() if k not in ("one", "out")}
    # results already in --out stay (a rerun adds or replaces configurations): the setup lists them all
    doc["setup"]["configs"] = list(dict.fromkeys([*doc["results"], *args.configs]))
    # the allocator's settings, which every process inherits (docs/guides/memory-and-threads.md)
    doc["setup"]["allocator_env"] = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
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
        r["setup"] = doc["setup"]  # each row keeps the arguments it ran with (rows may come from separate runs)
        print("    ->", {k: r[k] for k in ("ggn_product_s", "hessian_product_s", "error", "skipped") if k in r},
              flush=True)
        doc["summary"] = summarize(doc["results"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
