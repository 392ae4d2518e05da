"""Benchmark: curvdist's Hessian-vector products (every mode, auto, compile) against a plain double-backward HVP.

Models (float32, one batch, eval mode):
  * resnet18: ResNet-18 from curvdist.zoo (11,181,642 parameters with 10 classes, the "11.2M" configuration),
    32 images of 3×S×S (``--image-size``, default 64: at 224 one product takes tens of seconds on 2 CPU cores),
    BatchNorm statistics calibrated on the batch, mean cross-entropy;
  * gpt2-tiny / gpt2-mini: GPT-2 configurations from ``transformers`` (curvdist.zoo.hf_causal_lm, eager
    attention) on a seeded Markov token corpus, the causal-LM loss (mean over the non-ignored next tokens).

Per model, timed per product in interleaved rounds (the order rotates every round) so that the machine's load hits
every variant alike:
  * ``gradient``: one plain ``torch.autograd.grad`` of the batch loss (for scale);
  * ``plain_double_backward``: the baseline, written directly with ``torch.autograd`` on the model (loss with
    ``create_graph=True``, a second ``grad`` with v as output gradient), flat vector in and out as a solver needs
    (``plain_double_backward_raw``: the same on per-parameter tensors, no concatenation);
  * ``curvdist:<mode>`` for forward_over_reverse, reverse_over_reverse, finite_difference and auto:
    ``op.apply_vector(v)``, the solvers' entry point (the whole product: data pass, accumulation, scaling,
    flattening). With one batch, reverse_over_reverse keeps the graph of the gradient between products
    (``reuse_graph``, the default there); ``curvdist:reverse_over_reverse/fresh_graph`` is the same product with
    ``reuse_graph=False``, i.e. the plain algorithm, as paid when θ changes between products;
  * ``curvdist:<mode>+compile`` (``--compile`` models): the same with ``compile=True`` (inductor); its build time
    (the compilation) is reported separately.
Every product is compared with the baseline's (relative difference). Writes
benchmarks/results/hvp_benchmark.json and .png.

    python benchmarks/hvp_benchmark.py [--device cpu|cuda] [--threads 2] [--reps 5] [--image-size 64]
        [--models resnet18,gpt2-tiny,gpt2-mini] [--compile gpt2-tiny,gpt2-mini]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvdist as cd
from curvdist import zoo
from curvdist.operators.hessian import Hessian, clear_mode_cache

OUT = Path(__file__).parent / "results"
MODES = ("forward_over_reverse", "reverse_over_reverse", "finite_difference")
GPT2 = {
    "gpt2-tiny": ({"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_layer": 2,
                   "n_head": 2}, 8, 32),
    "gpt2-mini": ({"model_type": "gpt2", "vocab_size": 1024, "n_positions": 128, "n_embd": 128, "n_layer": 4,
                   "n_head": 4}, 8, 64),
}


class Case:
    """A model, its curvdist problem, and the plain loss of the same batch for the baseline."""

    def __init__(self, name: str, model: nn.Module, problem: cd.Problem, plain_loss: Callable[[], Tensor],
                 description: str) -> None:
        self.name, self.model, self.problem, self.plain_loss = name, model, problem, plain_loss
        self.description = description


def resnet_case(device: torch.device, image_size: int, batch: int) -> Case:
    torch.manual_seed(0)
    model = zoo.resnet18(num_classes=10).to(device)
    X = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    zoo.calibrate_batchnorm(model, [X])
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=batch)
    return Case("resnet18", model, problem, lambda: F.cross_entropy(model(X), y),
                f"ResNet-18 (zoo, 10 classes), {batch} images 3x{image_size}x{image_size}, float32, eval mode")


def gpt2_case(name: str, device: torch.device) -> Case:
    config, n, length = GPT2[name]
    model = zoo.hf_causal_lm(config, seed=0).to(device)
    data = zoo.markov_corpus(n=n, vocab_size=config["vocab_size"], max_length=length, seed=0)
    data = {k: t.to(device) for k, t in data.items()}
    problem = cd.Problem(model, "causal_lm", data, batch_size=n)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    return Case(name, model, problem, lambda: model(**inputs, labels=data["labels"]).loss,
                f"GPT-2 ({config['n_layer']} layers, d={config['n_embd']}, vocab {config['vocab_size']}, "
                f"transformers, eager attention), {n} sequences of {length} tokens, causal-LM loss, float32")


class Plain:
    """The baseline: double backward written directly with torch.autograd on the model's own parameters."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.params = [p for p in case.model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]

    def split(self, v: Tensor) -> list[Tensor]:
        return [t.view_as(p) for t, p in zip(torch.split(v, self.sizes), self.params)]

    def raw(self, vs: list[Tensor]) -> tuple[Tensor, ...]:
        g = torch.autograd.grad(self.case.plain_loss(), self.params, create_graph=True)
        return torch.autograd.grad(g, self.params, vs)

    def flat(self, v: Tensor) -> Tensor:
        return torch.cat([h.reshape(-1) for h in self.raw(self.split(v))])

    def gradient(self) -> tuple[Tensor, ...]:
        return torch.autograd.grad(self.case.plain_loss(), self.params)


def product(op: Hessian, v: Tensor) -> Callable[[], Tensor]:
    return lambda: op.apply_vector(v)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_case(case: Case, device: torch.device, reps: int, compile_: bool) -> dict[str, Any]:
    problem = case.problem
    assert tuple(problem.param_names) == tuple(n for n, p in case.model.named_parameters() if p.requires_grad)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(1)).to(device)
    record: dict[str, Any] = {"description": case.description, "parameters": problem.dim, "build_s": {}}
    variants: dict[str, Callable[[], Any]] = {}

    plain = Plain(case)
    vs = plain.split(v)
    variants["gradient"] = plain.gradient
    variants["plain_double_backward"] = lambda: plain.flat(v)
    variants["plain_double_backward_raw"] = lambda: plain.raw(vs)

    clear_mode_cache()
    ops: dict[str, Hessian] = {}
    t0 = time.perf_counter()
    ops["auto"] = cd.operator(problem, "hessian", check_determinism=False)
    sync(device)
    record["build_s"]["auto"] = time.perf_counter() - t0
    record["auto"] = ops["auto"].product_info()
    for mode in MODES:
        t0 = time.perf_counter()
        ops[mode] = cd.operator(problem, "hessian", mode=mode, check_determinism=False)
        record["build_s"][mode] = time.perf_counter() - t0
    # the plain algorithm without the kept graph: what every product costs when θ changes between products
    ops["reverse_over_reverse/fresh_graph"] = cd.operator(problem, "hessian", mode="reverse_over_reverse",
                                                          reuse_graph=False, check_determinism=False)
    if compile_:
        for mode in MODES[:2]:
            t0 = time.perf_counter()
            op = cd.operator(problem, "hessian", mode=mode, compile=True, check_determinism=False)
            op.apply_vector(v)  # first product (compiled at construction; this one is warm)
            sync(device)
            record["build_s"][mode + "+compile"] = time.perf_counter() - t0
            if op.compiled:
                ops[mode + "+compile"] = op
            else:
                record.setdefault("compile_failures", {})[mode] = op.mode_failures
    for key, op in ops.items():
        variants["curvdist:" + key] = product(op, v)

    # correctness against the baseline, and a warm-up of every variant
    reference = variants["plain_double_backward"]()
    record["relative_difference_to_baseline"] = {
        k: rel(f(), reference) for k, f in variants.items() if k.startswith("curvdist:")}

    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            variants[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
        print(f"  {case.name} round {r + 1}/{reps}: " + ", ".join(f"{k}={times[k][-1]:.4f}" for k in names),
              flush=True)
    record["per_product_s"] = {k: {"median": statistics.median(t), "min": min(t), "all": t} for k, t in times.items()}
    summarize(record)
    return record


def summarize(record: dict[str, Any]) -> None:
    """Ratios to the baseline, compile speedups and the goal check, from the per-product times of a record."""
    med = {k: v["median"] for k, v in record["per_product_s"].items()}
    base, base_raw = med["plain_double_backward"], med["plain_double_backward_raw"]
    record["median_ratio_to_plain_double_backward"] = {k: t / base for k, t in med.items()}
    record["median_ratio_to_plain_double_backward_raw"] = {k: t / base_raw for k, t in med.items()}
    speedup = {m: med["curvdist:" + m] / med[f"curvdist:{m}+compile"] for m in MODES[:2]
               if f"curvdist:{m}+compile" in med}
    if speedup:
        # eager time of the same mode as the operator runs it (reverse-over-reverse through the kept graph) over
        # the compiled time; the compiled product cannot keep the graph, so also against the fresh-graph product
        record["compile_speedup"] = speedup
        if "curvdist:reverse_over_reverse+compile" in med:
            record["compile_speedup_reverse_over_reverse_vs_fresh_graph"] = (
                med["curvdist:reverse_over_reverse/fresh_graph"] / med["curvdist:reverse_over_reverse+compile"])
    record["auto_at_most_plain_double_backward"] = med["curvdist:auto"] <= base


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["models"])
    fig, axes = plt.subplots(1, len(cases), figsize=(6.2 * len(cases), 4.4), squeeze=False)
    for ax, name in zip(axes[0], cases):
        rec = results["models"][name]
        ratios = rec["median_ratio_to_plain_double_backward"]
        keys = [k for k in ratios if k != "plain_double_backward"]
        colors = ["0.6" if not k.startswith("curvdist") else ("C2" if k == "curvdist:auto" else "C0") for k in keys]
        ax.barh(range(len(keys)), [ratios[k] for k in keys], color=colors)
        ax.axvline(1.0, color="C3", lw=1.2, label="plain double backward")
        errors = rec["relative_difference_to_baseline"]
        labels = [k.replace("curvdist:", "cd:") + (f" (err {errors[k]:.0e})" if k in errors and errors[k] > 1e-4
                                                   else "") for k in keys]
        ax.set_yticks(range(len(keys)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median time per product / plain double backward")
        base = rec["per_product_s"]["plain_double_backward"]["median"]
        ax.set_title(f"{name} ({rec['parameters'] / 1e6:.2f}M params)\nbaseline {base * 1e3:.1f} ms, "
                     f"auto = {rec['auto']['mode']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Hessian-vector products on {results['device']} ({results['threads']} thread(s)): median time "
                 "per product relative to a plain double-backward HVP (err: relative difference to it)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="images per ResNet batch")
    parser.add_argument("--models", default="resnet18,gpt2-tiny,gpt2-mini")
    parser.add_argument("--compile", default="gpt2-tiny,gpt2-mini",
                        help="models on which the compiled products are measured (comma list, or 'none')")
    parser.add_argument("--out", default=str(OUT / "hvp_benchmark.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled = set() if args.compile == "none" else set(args.compile.split(","))
    results: dict[str, Any] = {
        "device": args.device, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "models": {},
    }
    t_start = time.perf_counter()
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        case = resnet_case(device, args.image_size, args.batch) if name == "resnet18" else gpt2_case(name, device)
        results["models"][name] = bench_case(case, device, args.reps, name in compiled)
        rec = results["models"][name]
        print(f"  auto -> {rec['auto']['mode']}; median ratio to plain double backward: "
              + ", ".join(f"{k}={r:.3f}" for k, r in rec["median_ratio_to_plain_double_backward"].items()),
              flush=True)
    results["load_average_at_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
