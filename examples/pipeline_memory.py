"""A pipeline run's memory per stage.

The parameters and peak memory of each pipeline stage, for a small GPT-2 run here and for GPT-2 small as stored by
the sharded benchmark.

Left: executed here. A small GPT-2 (from a `transformers` config, random seeded weights) is split into 2
pipeline stages on Ray actors (an embedded Ray instance on this machine), each batch cut into 2 micro-batches
that flow GPipe-style; the top GGN eigenvalue is computed through the stages and compared with the same query
on one process. Every query records, per process, the parameters it holds and its peak resident memory during
the query (`info["memory"]`). At this size each process's memory is mostly the Python interpreter and torch,
so the parameters held are the telling number: each stage holds about half of the model (the last one also a
copy of the tied embedding, which is the head).

Right: not executed at build time (it takes an hour on 2 cores). The peak resident memory per process for GPT-2
small (124M parameters) on one process and in pipeline mode with 2 and 4 stages, read from
`benchmarks/results/sharded_benchmark_gpt2_small.json` (written by `benchmarks/sharded_benchmark.py`).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import curvdist as cd  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/examples")
out.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parents[1]

config = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 4, "n_head": 2}
spec = cd.ProblemSpec("curvdist.zoo:hf_causal_lm", "curvdist.zoo:markov_corpus", loss="causal_lm",
                      model_kwargs={"config": config, "seed": 0},
                      data_kwargs={"n": 8, "vocab_size": 64, "max_length": 16, "min_length": 8, "seed": 0},
                      batch_size=8, dtype="float64")

local = spec.build()
cd.set_threads("auto", dim=local.dim)  # the free cores, capped by problem size
local.memory_reset()
ref = cd.eigs(cd.operator(local, "ggn"), k=1, tol=1e-6)
local_memory = local.memory_records()

with cd.ray_backend(workers=1, num_cpus=4) as backend:
    staged = backend.pipeline(spec, stages=2, micro_batches=2)
    staged.memory_reset()
    got = cd.eigs(cd.operator(staged, "ggn"), k=1, tol=1e-6)
    memory = staged.memory_records()

print(f"top GGN eigenvalue: one process {ref.value[0]:.10g}, 2 stages {got.value[0]:.10g} "
      f"(relative difference {abs(ref.value[0] - got.value[0]) / ref.value[0]:.1e})")
print(f"{'process':14}{'parameters':>12}{'peak RSS (MB)':>15}")
for m in local_memory + memory:
    print(f"{m['role']:14}{m['parameters']:12,d}{m['peak_rss_mb']:15.0f}")

bench = json.loads((root / "benchmarks/results/sharded_benchmark_gpt2_small.json").read_text())["results"]
runs = [("one process", "local"), ("2 stages", "pipeline_2x4"), ("4 stages", "pipeline_4x4")]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
rows = [m for m in local_memory + memory]
labels = [m["role"] for m in rows]
x = np.arange(len(rows))
ax1.bar(x, [m["parameters"] for m in rows], color=["C0"] + ["0.6"] + ["C1"] * (len(rows) - 2))
ax1.set_xticks(x, labels)
ax1.set_ylabel("parameters held")
ax1.set_title(f"executed: GPT-2 of {local.dim:,} parameters, 2 stages", fontsize=10)
for xi, m in zip(x, rows):
    ax1.annotate(f"{m['peak_rss_mb']:.0f} MB", (xi, m["parameters"]), ha="center", va="bottom", fontsize=8)

pos = 0.0
ticks, ticklabels = [], []
for i, (label, key) in enumerate(runs):
    procs = [m for m in bench[key]["memory"] if m["role"] != "coordinator"]
    xs = pos + np.arange(len(procs))
    ax2.bar(xs, [m["peak_rss_mb"] / 1024 for m in procs], color=f"C{i}", label=label)
    ticks += list(xs)
    ticklabels += [m["role"].replace("local", "process") for m in procs]
    pos += len(procs) + 1
ax2.set_xticks(ticks, ticklabels, rotation=30, ha="right", fontsize=8)
ax2.set_ylabel("peak resident memory (GB)")
ax2.set_title("stored benchmark: GPT-2 small (124M), one GGN/Hessian eigensolve", fontsize=10)
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "pipeline_memory.png", dpi=110)
