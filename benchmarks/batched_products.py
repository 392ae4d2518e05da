"""Benchmark: the per-vector cost of a batched curvature product C [v₁ … v_k] against k single products C v_i.

Model: a GPT-2 from a ``transformers`` config with random weights (curvdist.zoo.hf_causal_lm, eager attention, eval
mode, seed 0): vocab 512, n_positions 64, n_embd 256, 4 layers, 4 heads (3,307,008 parameters), float32, on a
seeded Markov token corpus of 4 sequences of at most 64 tokens (curvdist.zoo.markov_corpus), the causal-LM loss.

Variants (``--variants``):
  * ``hessian/reverse_over_reverse``, ``hessian/forward_over_reverse``, ``ggn``: 2 batches of 2 sequences, so a
    single Hessian product builds a fresh graph per batch (the default when a problem has several batches);
  * ``hessian/reverse_over_reverse/kept_graph``: 1 batch of 4 sequences, where the single Hessian product runs
    through the kept graph of the gradient (``reuse_graph``, the default for one batch): only the second backward
    per vector — the strongest single-product baseline. Block products always build their own graph.

Per variant, timed alone (no memory instrumentation) in ``--rounds`` interleaved rounds after a warm-up (the order
of the two measurements alternates between rounds): k single products ``op.apply_vector(v_i)`` (the solvers' entry
point) and one block product ``op.apply_vectors([v_1 … v_k])`` (= ``op.apply_block``). Reported: seconds per vector
of each, on two clocks, and their ratio block/single (the issue's goal: ≤ 0.6 at k = 8), and the largest relative
difference of a block column from its single product.

Threads and clocks. The model is sized for 2 cores, but the machine's 2 cores are shared with other jobs: with 2
intra-op threads under that load a single product took anywhere from 0.9 s to 16 s (OpenMP threads waiting for a
descheduled partner), so the default is 1 thread (``--threads``) and the headline clock is the process's CPU time
(``time.process_time``: the work of the one thread, whatever else runs); wall time is recorded next to it.

Matmul FLOPs, counted apart (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention
kernels; elementwise ops are not counted): a plain gradient of the same batches, one single product and one block
product. With a block costing B = shared + k·per and a single product S = shared + per (the forward pass and, for
the Hessian, the first backward are shared; the rest is per vector), ``flop_ratio`` = (B/k)/S is the ratio the
timing would show if time followed matmul FLOPs, and ``flop_ratio_limit`` = per/S its limit as k grows: the goal is
reachable by batching alone only where these are below it, and otherwise only by making the batched matmuls faster
per FLOP than the single product's (larger, better-shaped matrices), which one CPU thread barely does.

Memory, measured apart: the peak resident memory above the starting point of one single product and of one block
product, each in a fresh process (``--child``) after ``malloc_trim``, with the resident high-water mark reset
(curvdist.resources; on a GPU the allocator's peak). Writes benchmarks/results/batched_products.json.

    python benchmarks/batched_products.py [--k 8] [--threads 1] [--rounds 3] [--device cpu]
        [--variants hessian/reverse_over_reverse,ggn,...] [--no-memory] [--no-flops]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import curvdist as cd
from curvdist import resources, zoo

OUT = Path(__file__).parent / "results" / "batched_products.json"
CONFIG = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": 256, "n_layer": 4, "n_head": 4}
SEQUENCES, LENGTH = 4, 64
#: name -> (curvature kind, operator options, sequences per batch)
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "hessian/reverse_over_reverse": ("hessian", {"mode": "reverse_over_reverse"}, 2),
    "hessian/forward_over_reverse": ("hessian", {"mode": "forward_over_reverse"}, 2),
    "ggn": ("ggn", {}, 2),
    "hessian/reverse_over_reverse/kept_graph": ("hessian", {"mode": "reverse_over_reverse"}, SEQUENCES),
}
MB = 2.0 ** 20


def build(variant: str, device: torch.device, k: int) -> tuple[Any, list[Tensor]]:
    """The operator of ``variant`` (no products at construction) and k seeded probe vectors."""
    kind, options, batch = VARIANTS[variant]
    model = zoo.hf_causal_lm(CONFIG, seed=0).to(device)
    data = {key: t.to(device) for key, t in zoo.markov_corpus(n=SEQUENCES, vocab_size=CONFIG["vocab_size"],
                                                              max_length=LENGTH, seed=0).items()}
    problem = cd.Problem(model, "causal_lm", data, batch_size=batch)
    op = cd.operator(problem, kind, check_determinism=False, **options)
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(problem.dim, generator=g).to(device, op.dtype) for _ in range(k)]
    return op, vs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def singles(op: Any, vs: list[Tensor]) -> list[Tensor]:
    return [op.apply_vector(v) for v in vs]


def block(op: Any, vs: list[Tensor]) -> list[Tensor]:
    return op.apply_vectors(vs)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def time_variant(variant: str, device: torch.device, k: int, rounds: int) -> dict[str, Any]:
    op, vs = build(variant, device, k)
    one, many = singles(op, vs), block(op, vs)  # warm-up (and the kept graph, where there is one)
    diff = max(rel(b, s) for b, s in zip(many, one))
    del one, many
    times: dict[str, dict[str, list[float]]] = {w: {"cpu": [], "wall": []} for w in ("single", "block")}
    for r in range(rounds):
        for what in (("single", "block") if r % 2 == 0 else ("block", "single")):
            sync(device)
            c0, w0 = time.process_time(), time.perf_counter()
            out = singles(op, vs) if what == "single" else block(op, vs)
            sync(device)
            times[what]["cpu"].append((time.process_time() - c0) / k)
            times[what]["wall"].append((time.perf_counter() - w0) / k)
            del out
    record: dict[str, Any] = {"operator": {"mode": getattr(getattr(op, "mode", None), "value", None),
                                           "reuse_graph": getattr(op, "reuse_graph", None),
                                           "batches": op.problem.num_batches,
                                           "block_vectorized": op.block_vectorized},
                              "max_relative_difference": diff}
    for clock in ("cpu", "wall"):
        single, blk = times["single"][clock], times["block"][clock]
        record[clock] = {"single_s_per_vector": single, "block_s_per_vector": blk,
                         "ratio_median": statistics.median(blk) / statistics.median(single),
                         "ratio_min": min(blk) / min(single)}
    c, w = record["cpu"], record["wall"]
    print(f"{variant}: CPU s/vector single {statistics.median(c['single_s_per_vector']):.3f}, block "
          f"{statistics.median(c['block_s_per_vector']):.3f}, ratio {c['ratio_median']:.2f} "
          f"(wall: {w['ratio_median']:.2f}); max rel. difference {diff:.1e}", flush=True)
    return record


def flops(variant: str, device: torch.device, k: int) -> dict[str, Any]:
    """Matmul FLOPs (FlopCounterMode) of a plain gradient, a single product and a block of k, after a warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    op, vs = build(variant, device, k)
    singles(op, vs[:1]), block(op, vs)  # warm-up: kept graph and the block kernel's choice (vmap or loop)

    def count(fn: Any) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    def gradient() -> None:
        problem = op.problem
        with torch.enable_grad():
            for X, y in problem.batches():
                leaves = tuple(p.detach().requires_grad_() for p in problem.params)
                torch.autograd.grad(problem.batch_loss(leaves, X, y), leaves)

    grad_flops = count(gradient)
    single, blk = count(lambda: op.apply_vector(vs[0])), count(lambda: op.apply_vectors(vs))
    per = (blk - single) / (k - 1)
    record = {"gradient": grad_flops, "single": single, "block": blk, "block_per_vector": blk / k,
              "per_vector_part": per, "shared_part": single - per, "single_over_gradient": single / grad_flops,
              "flop_ratio": blk / k / single, "flop_ratio_limit": per / single}
    print(f"{variant}: matmul GFLOP gradient {grad_flops / 1e9:.2f}, single {single / 1e9:.2f}, block/k "
          f"{blk / k / 1e9:.2f}: ratio {record['flop_ratio']:.3f}, limit as k grows {per / single:.3f}", flush=True)
    return record


def _trim() -> None:
    """Collect garbage and return the allocator's free memory to the system before a measurement."""
    gc.collect()
    resources.release_free_memory()


def child(variant: str, what: str, device: torch.device, k: int) -> None:
    """One product (``single``: one vector; ``block``: k vectors) in this fresh process; prints its peak memory."""
    op, vs = build(variant, device, k)
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        windowed = resources.reset_peak()
        start = resources.rss_mb() * MB
    out = op.apply_vector(vs[0]) if what == "single" else op.apply_vectors(vs)
    sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resources.peak_rss_mb() * MB)
    del out
    record = {"start_mb": start / MB, "peak_mb": peak / MB, "extra_mb": (peak - start) / MB,
              "windowed": True if device.type == "cuda" else windowed}
    print("RESULT " + json.dumps(record), flush=True)


def memory(variant: str, what: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, what, "--k", str(args.k), "--threads", str(args.threads),
           "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def summarize(results: dict[str, Any], k: int) -> dict[str, Any]:
    """Per variant: the CPU-time ratio (medians), whether it meets the goal (≤ 0.6), and the block's extra memory per
    vector relative to a single product's; for the Hessian also its fastest block against its fastest single product
    over the two exact modes (what ``mode="auto"`` would compare)."""
    med = statistics.median
    summary: dict[str, Any] = {}
    for name, r in results.items():
        line = {"ratio_cpu": r["cpu"]["ratio_median"], "ratio_wall": r["wall"]["ratio_median"],
                "goal_met": r["cpu"]["ratio_median"] <= 0.6}
        if "flops" in r:
            line["flop_ratio"] = r["flops"]["flop_ratio"]
            line["flop_ratio_limit"] = r["flops"]["flop_ratio_limit"]
            line["time_over_flop_ratio"] = r["cpu"]["ratio_median"] / r["flops"]["flop_ratio"]
        if "memory" in r:
            line["memory_per_vector_block_over_single"] = r["memory"]["block_over_single_extra"] / k
        summary[name] = line
    modes = [n for n in ("hessian/reverse_over_reverse", "hessian/forward_over_reverse") if n in results]
    if len(modes) == 2:
        single = min(med(results[n]["cpu"]["single_s_per_vector"]) for n in modes)
        blk = min(med(results[n]["cpu"]["block_s_per_vector"]) for n in modes)
        summary["hessian/fastest_block_over_fastest_single"] = {"ratio_cpu": blk / single,
                                                                  "goal_met": blk / single <= 0.6}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        child(args.child[0], args.child[1], device, args.k)
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    started = time.time()
    results: dict[str, Any] = {}
    for name in names:
        results[name] = time_variant(name, device, args.k, args.rounds)
    if not args.no_flops:
        for name in names:
            results[name]["flops"] = flops(name, device, args.k)
    if not args.no_memory:
        for name in names:
            mem = {what: memory(name, what, args) for what in ("single", "block")}
            mem["block_over_single_extra"] = mem["block"]["extra_mb"] / max(mem["single"]["extra_mb"], 1e-9)
            results[name]["memory"] = mem
            print(f"{name}: extra peak memory, single {mem['single']['extra_mb']:.0f} MiB, block of {args.k} "
                  f"{mem['block']['extra_mb']:.0f} MiB", flush=True)
    op, _ = build(names[0], device, 1)
    out = {
        "summary": summarize(results, args.k),
        "benchmark": "batched_products",
        "goal": f"per-vector cost of a batched product at k = {args.k} <= 0.6 x a single product",
        "k": args.k,
        "model": {"factory": "curvdist.zoo.hf_causal_lm (transformers GPT-2, eager attention, eval, seed 0)",
                  "config": CONFIG, "parameters": op.dim, "dtype": "float32",
                  "data": f"curvdist.zoo.markov_corpus(n={SEQUENCES}, vocab_size={CONFIG['vocab_size']}, "
                          f"max_length={LENGTH}, seed=0), causal_lm loss (mean over tokens)"},
        "variants": {name: {"curvature": VARIANTS[name][0], "options": VARIANTS[name][1],
                            "sequences_per_batch": VARIANTS[name][2]} for name in names},
        "results": results,
        "method": ("per variant: a warm-up, then --rounds interleaved rounds of k single products "
                   "(op.apply_vector) and one block product (op.apply_vectors) of the same k vectors; seconds per "
                   "vector on two clocks: 'cpu' (time.process_time: this process's CPU seconds, what one thread's "
                   "work costs whatever else runs on the machine) and 'wall'; ratio = block per vector / single per "
                   "vector (medians over rounds; the minima's ratio too). Memory: peak resident (CPU) or allocated "
                   "(GPU) memory above the start of one product, each product in a fresh process. FLOPs: matmul "
                   "FLOPs (torch.utils.flop_counter.FlopCounterMode) of a gradient, one single and one block "
                   "product; flop_ratio = block per vector / single, flop_ratio_limit = its limit as k grows."),
        "machine": {"device": str(device), "threads": args.threads, "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "wall_s": time.time() - started,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
