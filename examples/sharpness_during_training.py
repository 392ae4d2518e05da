"""Invariant vs Euclidean sharpness during training.

The digits MLP is trained with Adam; every 25 steps the top eigenvalue of the Hessian ("sharpness") is measured
in the training coordinates θ and, at the same point, in rescaled coordinates θ = c ⊙ ψ — once with the Euclidean
metric, once as the top eigenvalue of M⁻¹H with the damped Fisher metric. The Euclidean curves of θ and ψ differ
by orders of magnitude along the whole run (and need not even move together); the invariant curves coincide.
"""

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import curvdist as cd  # noqa: E402
from curvdist import zoo  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/examples")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cd.set_threads("auto", dim=1210)  # the free cores, capped by problem size: 1 thread below 10⁴ parameters

model = zoo.mlp(64, (16,), 10, activation="tanh", dtype="float64")
X, y = zoo.digits(split="train", n=512, dtype="float64")
units = cd.reparam.scale({"0.weight": 100.0, "0.bias": 10.0, "2.weight": 0.01, "2.bias": 0.1})
opt = torch.optim.Adam(model.parameters(), lr=0.01)


def sharpness(problem, fisher_damping_reference="identity"):
    """Top eigenvalue of H (Euclidean) and of M⁻¹H (damped Fisher metric) at the problem's current point."""
    H = cd.operator(problem, "hessian", check_determinism=False)
    F = cd.metric(problem, "fisher", damping=1e-2, damping_reference=fisher_damping_reference)
    return cd.eigs(H, k=1, tol=1e-6).value[0], cd.eigs(H, k=1, metric=F, tol=1e-6).value[0]


steps, history = 250, []
t0 = time.perf_counter()
for step in range(steps + 1):
    if step % 25 == 0:
        model.eval()
        theta = cd.Problem(model, "cross_entropy", (X, y))
        psi = cd.reparametrize(theta, units)
        e_theta, f_theta = sharpness(theta)
        e_psi, f_psi = sharpness(psi, "pullback")  # δ·JᵀJ: the θ damping carried along, so M stays a tensor
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(X), y))
        history.append((step, loss, e_theta, e_psi, f_theta, f_psi))
        model.train()
    if step < steps:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()

print(f"{'step':>5} {'loss':>8} {'λ(H) θ':>11} {'λ(H) ψ':>11} {'λ(M⁻¹H) θ':>11} {'λ(M⁻¹H) ψ':>11} {'rel. diff':>9}")
for step, loss, e_t, e_p, f_t, f_p in history:
    print(f"{step:5d} {loss:8.4f} {e_t:11.4g} {e_p:11.4g} {f_t:11.6g} {f_p:11.6g} {abs(f_t - f_p) / abs(f_t):9.1e}")
print(f"({time.perf_counter() - t0:.1f} s)")

s = [h[0] for h in history]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
ax1.semilogy(s, [h[2] for h in history], "-o", ms=3, label="θ coordinates")
ax1.semilogy(s, [h[3] for h in history], "--s", ms=3, label="ψ coordinates")
ax1.set_title("Euclidean sharpness λ_max(H)", fontsize=10)
ax2.plot(s, [h[4] for h in history], "-o", ms=3, label="θ coordinates")
ax2.plot(s, [h[5] for h in history], "--s", ms=3, label="ψ coordinates")
ax2.set_title("invariant sharpness λ_max(M⁻¹H), damped Fisher", fontsize=10)
for ax in (ax1, ax2):
    ax.set_xlabel("Adam step")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "sharpness_during_training.png", dpi=110)
