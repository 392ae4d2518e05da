"""Per-block spectra of a small GPT-2.

A 3-layer GPT-2 built from a `transformers` config (random seeded weights, nothing downloaded) is trained
briefly on a seeded synthetic Markov-chain corpus. `cd.block_spectra` then computes, for every
transformer block (and the embeddings and final norm), the top eigenvalues and the trace of the block's GGN
C_b (dense for small blocks; Lanczos for the top three and Hutch++ for the trace of a transformer
block) — once in the Euclidean metric, once as the generalized spectrum of (C_b, M_b) with the block's damped
Kronecker-factored (KFAC) metric. The Euclidean spectra depend on how each block happens to be parametrized; the
metric-relative ones do not change under a per-tensor rescaling (KFAC is a tensor under per-tensor scalar
Jacobians, such as the NTK parametrization).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import curvdist as cd  # noqa: E402
from curvdist.zoo import hf_causal_lm, markov_corpus  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/examples")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

config = {"model_type": "gpt2", "vocab_size": 32, "n_positions": 16, "n_embd": 16, "n_layer": 3, "n_head": 2}
model = hf_causal_lm(config, seed=0, dtype="float32")
cd.set_threads("auto", dim=sum(p.numel() for p in model.parameters()))  # free cores, capped by problem size
data = markov_corpus(n=16, vocab_size=32, max_length=12, min_length=6, seed=0)

# a few Adam steps on the corpus (the LM loss shifts labels by one, ignoring -100)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
inputs = {k: v for k, v in data.items() if k != "labels"}
for _ in range(40):
    opt.zero_grad()
    logits = model(**inputs).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), data["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    opt.step()
model.eval()
print(f"{sum(p.numel() for p in model.parameters()):,} parameters, training loss {loss.item():.3f}")

problem = cd.Problem(model, "causal_lm", data, batch_size=16)
results = {}
for label, metric in (("euclidean", None), ("kfac (δ=1e-3)", "kfac")):
    r = cd.block_spectra(problem, "ggn", metric=metric, damping=1e-3, groups="block", k=3, compare=False,
                         dense_block_dim=64, trace_matvecs=20, seed=0)
    results[label] = r.value["blocks"]
    print(f"\n{label}: {r.seconds:.1f} s")
    print(f"  {'block':24}{'dim':>6}{'λ1':>12}{'λ2':>12}{'λ3':>12}{'trace':>12}")
    for name, b in r.value["blocks"].items():
        top = list(b["eigenvalues"][:3]) + [float("nan")] * (3 - min(3, len(b["eigenvalues"])))
        print(f"  {name:24}{b['dim']:6d}" + "".join(f"{v:12.4g}" for v in top) + f"{b['trace']:12.4g}")

names = list(results["euclidean"])
x = np.arange(len(names))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (label, blocks) in zip(axes, results.items()):
    tops = np.array([blocks[n]["eigenvalues"][:3] for n in names])
    for j in range(tops.shape[1]):
        ax.scatter(x, tops[:, j], marker="o_v"[j] if j < 3 else ".", label=f"λ{j + 1}", zorder=3)
    ax.bar(x, [blocks[n]["trace"] for n in names], color="0.85", label="trace", zorder=1)
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace("transformer.", "") for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_title(f"GGN block spectra, {label}", fontsize=10)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "gpt2_block_spectra.png", dpi=110)
