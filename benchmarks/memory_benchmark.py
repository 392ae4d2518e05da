"""Benchmark: peak memory of curvdist's gradient and products against plain autograd (issue 20, item 2).

A GPT-2-style decoder built from a transformers config with random weights (vocab 8192, context 64, n_embd 512,
6 layers, 8 heads: about 23M parameters, float32), a batch of 8 sequences of 64 tokens, causal-LM loss. Each
measurement runs in a fresh process: the model and the batch are built, the resident high-water mark is reset, the
measured call runs once, and the peak above the resident size before the call is recorded (MiB):

* ``plain_gradient``: ``loss.backward()`` (the parameters' ``.grad``);
* ``curvdist_gradient``: ``cd.Problem(...).gradient()``;
* ``plain_hvp``: double backward, ∇(∇L·v);
* ``curvdist_hvp_default``: ``cd.operator(problem, "hessian")`` with default options, then one product (the default
  memory budget splits the batch where a product's graph would exceed the gradient's forward graph);
* ``curvdist_hvp_no_budget``: the same with ``memory_budget=None`` (the whole batch, its graph kept);
* ``curvdist_hvp_reverse_over_reverse``, ``curvdist_hvp_forward_over_reverse``: the same with that ``mode``;
* ``curvdist_ggn_default``: ``cd.operator(problem, "ggn")``, then one product.

Goals (issue 20): curvdist's gradient ≤ 1.15× the plain gradient's peak; operator + one product ≤ 2× the plain
gradient's. Each row also records the measured call's wall time (``seconds``: construction and one product for the
operators) and, for the operators, how the products are computed (``product_info``). Writes
benchmarks/results/memory_benchmark.json.

    python benchmarks/memory_benchmark.py [--threads 2]
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
OUT = ROOT / "benchmarks" / "results" / "memory_benchmark.json"
CONFIG = {"model_type": "gpt2", "vocab_size": 8192, "n_positions": 64, "n_embd": 512, "n_layer": 6, "n_head": 8,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
MODES = ("plain_gradient", "curvdist_gradient", "plain_hvp", "curvdist_hvp_default", "curvdist_hvp_no_budget",
         "curvdist_hvp_reverse_over_reverse", "curvdist_hvp_forward_over_reverse", "curvdist_ggn_default")


def measure(mode: str, threads: int) -> dict[str, Any]:
    import torch

    import curvdist as cd
    from curvdist import zoo
    from curvdist.problem.outputs import network_output
    from curvdist.resources import peak_rss_mb, reset_peak, rss_mb

    torch.set_num_threads(threads)
    model = zoo.hf_causal_lm(config=CONFIG, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (8, 64), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    v = [torch.randn(p.shape, generator=g) for p in model.parameters()]

    def loss_fn() -> Any:
        logits = network_output(model(ids))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    problem = cd.Problem(model, "causal_lm", [batch]) if mode.startswith("curvdist") else None
    before = rss_mb()
    reset_peak()
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if mode == "plain_gradient":
        loss_fn().backward()
    elif mode == "curvdist_gradient":
        problem.gradient()  # type: ignore[union-attr]
    elif mode == "plain_hvp":
        params = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        torch.autograd.grad(grads, params, grad_outputs=v)
    elif mode == "curvdist_ggn_default":
        cd.operator(problem, "ggn").apply_vector(torch.cat([t.reshape(-1) for t in v]))
    else:
        mode_option = mode.removeprefix("curvdist_hvp_")
        options = {"default": {}, "no_budget": {"memory_budget": None}}.get(mode_option, {"mode": mode_option})
        op = cd.operator(problem, "hessian", **options)  # type: ignore[arg-type]
        op.apply_vector(torch.cat([t.reshape(-1) for t in v]))
        info = op.product_info()
    return {"mode": mode, "peak_above_mb": peak_rss_mb() - before, "rss_before_mb": before,
            "seconds": time.perf_counter() - t0, "parameters": sum(p.numel() for p in model.parameters()),
            **({"product_info": info} if info else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = {}
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--one", mode, "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: {rows[mode]['peak_above_mb']:.0f} MiB above the baseline", flush=True)
    plain = rows["plain_gradient"]["peak_above_mb"]
    doc = {"benchmark": "memory", "model": CONFIG, "batch": [8, 64], "dtype": "float32", "rows": rows,
           "parameters": rows["plain_gradient"]["parameters"], "load": os.getloadavg(),
           "gradient_over_plain": rows["curvdist_gradient"]["peak_above_mb"] / plain,
           "operator_and_product_over_plain_gradient": rows["curvdist_hvp_default"]["peak_above_mb"] / plain,
           "operator_and_ggn_product_over_plain_gradient": rows["curvdist_ggn_default"]["peak_above_mb"] / plain,
           "plain_hvp_over_plain_gradient": rows["plain_hvp"]["peak_above_mb"] / plain,
           "goals": {"gradient_le_1.15x": rows["curvdist_gradient"]["peak_above_mb"] <= 1.15 * plain,
                     "operator_and_product_le_2x": rows["curvdist_hvp_default"]["peak_above_mb"] <= 2 * plain,
                     "operator_and_ggn_product_le_2x": rows["curvdist_ggn_default"]["peak_above_mb"] <= 2 * plain}}
    OUT.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("rows", "model")}, indent=1))


if __name__ == "__main__":
    main()
