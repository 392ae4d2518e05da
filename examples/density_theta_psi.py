"""Spectral densities in θ and in ψ.

The digits MLP is trained to a near-minimum and reparametrized by a change of units per tensor, θ = c ⊙ ψ. The
spectral density of the Euclidean Hessian (left) moves by orders of magnitude between the two coordinate systems;
the density of M⁻¹H with the damped Fisher metric (right) is the same curve in both, because M⁻¹H only undergoes
a similarity transform J⁻¹(M⁻¹H)J.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import curvdist as cd  # noqa: E402
from curvdist import zoo  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/examples")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cd.set_threads("auto", dim=1210)  # the free cores, capped by problem size: 1 thread below 10⁴ parameters

# the digits MLP (64-16-10, tanh, float64), trained full-batch with Adam to a near-minimum
model = zoo.mlp(64, (16,), 10, activation="tanh", dtype="float64")
X, y = zoo.digits(split="train", dtype="float64")
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(400):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
model.eval()

theta = cd.Problem(model, "cross_entropy", (X, y))
# a change of units: θ = c ⊙ ψ with one factor per tensor (the quickstart's factors)
psi = cd.reparametrize(theta, cd.reparam.scale({"0.weight": 100.0, "0.bias": 10.0, "2.weight": 0.01, "2.bias": 0.1}))

rows, curves = [], {}
for name, problem in (("θ", theta), ("ψ", psi)):
    H = cd.operator(problem, "hessian")
    F = cd.metric(problem, "fisher", damping=1e-2, damping_reference="pullback") if name == "ψ" else \
        cd.metric(problem, "fisher", damping=1e-2)
    for label, metric in (("euclidean", None), ("fisher+0.01", F)):
        r = cd.density(H, metric=metric, probes=3, steps=40, seed=0)
        curves[name, label] = r.value
        top = cd.eigs(H, k=1, metric=metric).value[0]
        rows.append((name, label, top, r.info["support"]))

print(f"{'coords':7}{'metric':14}{'top eigenvalue':>18}   SLQ support")
for name, label, top, (lo, hi) in rows:
    print(f"{name:7}{label:14}{top:18.6g}   [{lo:.3g}, {hi:.3g}]")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
panels = ((axes[0], [("θ", "euclidean", "-", "C0")], "Euclidean H in θ"),
          (axes[1], [("ψ", "euclidean", "--", "C1")], "Euclidean H in ψ (note the x scale)"),
          (axes[2], [("θ", "fisher+0.01", "-", "C0"), ("ψ", "fisher+0.01", "--", "C1")],
           "M⁻¹H, damped Fisher metric: θ and ψ"))
for ax, lines, title in panels:
    for name, label, style, color in lines:
        v = curves[name, label]
        ax.plot(np.asarray(v["grid"]), np.asarray(v["density"]), style, color=color, label=f"{name} coordinates")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, None)
    ax.set_xlabel("eigenvalue")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
axes[0].set_ylabel("smoothed spectral density")
fig.tight_layout()
fig.savefig(out / "density_theta_psi.png", dpi=110)
