"""Draws the figures of the Concepts page at build time (mkdocs-gen-files): small closed-form examples in numpy,
each showing one transformation rule of DESIGN §1 (no curvdist computation; the executed examples do that).
Also copies the figure that launchers/deepspeed/README.md shows next to the DeepSpeed guide, which includes that
README."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def quadratic_figure() -> plt.Figure:
    """A quadratic loss in θ and in ψ with θ = diag(c) ψ: the Euclidean Hessian's eigenvalues change, M⁻¹H's don't."""
    H = np.array([[2.0, 0.6], [0.6, 1.0]])
    c = np.array([1.0, 6.0])  # θ = C ψ: a change of units of the second coordinate
    J = np.diag(c)
    Hpsi = J.T @ H @ J
    M = np.array([[1.5, 0.2], [0.2, 0.5]])  # a metric in θ, carried along as JᵀMJ
    Mpsi = J.T @ M @ J
    eig = lambda A: np.sort(np.linalg.eigvals(A).real)[::-1]  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, A, Mx, name, lim in ((axes[0], H, M, "θ", 3.0), (axes[1], Hpsi, Mpsi, "ψ", 3.0)):
        g = np.linspace(-lim, lim, 200)
        X, Y = np.meshgrid(g, g)
        Z = 0.5 * (A[0, 0] * X**2 + 2 * A[0, 1] * X * Y + A[1, 1] * Y**2)
        ax.contour(X, Y, Z, levels=[0.25, 1, 2, 4, 8], colors="C0", linewidths=1)
        w, V = np.linalg.eigh(A)
        for k in range(2):
            ax.annotate("", xy=V[:, k] * 1.5, xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "C3"})
        h, m = eig(A), eig(np.linalg.solve(Mx, A))
        ax.set_title(f"loss in {name} coordinates\neig(H) = {h[0]:.3g}, {h[1]:.3g}     "
                     f"eig(M⁻¹H) = {m[0]:.3g}, {m[1]:.3g}", fontsize=9)
        ax.set_xlabel(f"{name}₁")
        ax.set_ylabel(f"{name}₂")
        ax.set_aspect("equal")
    return fig


def density_figure() -> plt.Figure:
    """A density on θ > 0 and the same belief in ψ = log θ: the ordinary mode moves, the mode of the density w.r.t.
    the Riemannian volume (p/√det M, Fisher metric of a scale, M(θ) = 1/θ²) does not."""
    k, s = 3.0, 1.0  # Gamma(shape k, scale s) on θ
    theta = np.linspace(1e-3, 12, 4000)
    p_theta = theta ** (k - 1) * np.exp(-theta / s)
    inv_theta = p_theta * theta  # p(θ)/√M(θ) with M = 1/θ²
    psi = np.linspace(-4, 3, 4000)
    p_psi = np.exp(psi) ** (k - 1) * np.exp(-np.exp(psi) / s) * np.exp(psi)  # p_θ(e^ψ)·|dθ/dψ|
    inv_psi = p_psi / 1.0  # M_ψ = (dθ/dψ)² M_θ = 1
    norm = lambda y, x: y / np.trapezoid(y, x)  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(theta, norm(p_theta, theta), label="p(θ)")
    ax1.plot(theta, norm(inv_theta, theta), "--", label="p(θ)/√M(θ)")
    ax2.plot(psi, norm(p_psi, psi), label="p(ψ) = p(θ(ψ))·|dθ/dψ|")
    ax2.plot(psi, norm(inv_psi, psi), "--", label="p(ψ)/√M(ψ)")
    t_map, t_inv = theta[np.argmax(p_theta)], theta[np.argmax(inv_theta)]
    p_map, p_inv = psi[np.argmax(p_psi)], psi[np.argmax(inv_psi)]
    ax1.axvline(t_map, color="C0", lw=0.8)
    ax1.axvline(t_inv, color="C1", lw=0.8, ls="--")
    ax2.axvline(np.log(t_map), color="C0", lw=0.8, ls=":", label=f"log(θ-mode) = {np.log(t_map):.2f}")
    ax2.axvline(p_map, color="C0", lw=0.8)
    ax2.axvline(p_inv, color="C1", lw=0.8, ls="--")
    ax1.set_title(f"θ > 0: modes {t_map:.2f} (p) and {t_inv:.2f} (invariant)", fontsize=9)
    ax2.set_title(f"ψ = log θ: modes {p_map:.2f} = log {np.exp(p_map):.2f} (p) and {p_inv:.2f} = log "
                  f"{np.exp(p_inv):.2f} (invariant)", fontsize=9)
    ax1.set_xlabel("θ")
    ax2.set_xlabel("ψ")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    return fig


def riemannian_figure() -> plt.Figure:
    """L(θ) = ½a(θ − θ*)², θ = e^ψ, pull-back of the Euclidean metric: the eigenvalue of M⁻¹H in ψ with the naive
    Hessian agrees with θ's only at the critical point; with the Riemannian Hessian JᵀH_θJ everywhere."""
    a, star = 2.0, 1.0
    theta = np.linspace(0.3, 3.0, 400)
    grad = a * (theta - star)
    J = theta  # dθ/dψ
    M_psi = J**2
    riemannian = J * a * J / M_psi  # (JᵀH_θJ)/M_ψ
    naive = (J * a * J + grad * theta) / M_psi  # (JᵀH_θJ + L'(θ) φ''(ψ)) / M_ψ, φ'' = e^ψ = θ
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(theta, np.full_like(theta, a), label="θ: H_θ (Euclidean metric)")
    ax.plot(theta, riemannian, "--", label="ψ: Riemannian Hessian JᵀH_θJ, pull-back metric")
    ax.plot(theta, naive, ":", lw=2, label="ψ: Hessian of L(e^ψ), pull-back metric")
    ax.axvline(star, color="0.5", lw=0.8)
    ax.annotate("critical point", (star, 0.5), xytext=(star + 0.1, 0.5), fontsize=8)
    ax.set_xlabel("θ = e^ψ")
    ax.set_ylabel("eigenvalue of M⁻¹H")
    ax.set_title("L(θ) = (θ − 1)², ψ = log θ", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    import mkdocs_gen_files

    for name, make in (("quadratic", quadratic_figure), ("densities", density_figure),
                       ("riemannian_hessian", riemannian_figure)):
        fig = make()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        with mkdocs_gen_files.open(f"concepts/{name}.png", "wb") as f:
            f.write(buf.getvalue())
    launcher_figure = Path(__file__).resolve().parents[2] / "launchers" / "deepspeed" / "flatness.png"
    with mkdocs_gen_files.open("guides/flatness.png", "wb") as f:
        f.write(launcher_figure.read_bytes())


if __name__ in ("__main__", "<run_path>"):
    main()
