"""Invariant densities: the Riemannian-volume posterior's mode and Laplace evidence do not move under an exp
reparametrization of a positive gain, while the ordinary MAP does."""

from __future__ import annotations

import pytest
import torch

import curvdist as cd
from curvdist import zoo
from curvdist.geometry import densities as D
from tests import dense

ALPHA = 1.0


@pytest.fixture(scope="module")
def setup():
    X, y = zoo.regression(n=64, in_features=3, out_features=2, noise=0.3, seed=0, dtype="float64")
    model = zoo.gain_regressor(3, 2, gain=1.0, seed=0, dtype="float64")
    pt = cd.Problem(model, "mse", (X, y))
    r = cd.reparam.exp("gain")
    pp = cd.reparametrize(pt, r)
    prior = D.gaussian_log_prior(ALPHA)
    prior_psi = D.pulled_back_log_density(prior, pp)
    phi = lambda f: r.flatten_theta(r.forward(r.unflatten_psi(f)))  # noqa: E731
    map_t = D.map_estimate(pt, prior)
    map_p = D.map_estimate(pp, prior_psi)
    inv_t = D.invariant_map(pt, prior, ALPHA, start=map_t.point)
    inv_p = D.invariant_map(pp, prior_psi, ALPHA, start=map_p.point)
    return dict(pt=pt, pp=pp, prior=prior, prior_psi=prior_psi, phi=phi, map_t=map_t, map_p=map_p, inv_t=inv_t,
                inv_p=inv_p, model=model, X=X, y=y)


def test_fisher_matrix_is_the_sum_ggn(setup):
    pt, model = setup["pt"], setup["model"]
    expected = dense.dense_ggn(model, "mse", setup["X"], setup["y"], "sum")
    torch.testing.assert_close(D.fisher_matrix(pt, pt.flatten(pt.params)), expected, rtol=1e-10, atol=1e-12)


def test_change_of_variables_for_exp(setup):
    """log p_ψ(ψ) = log p_θ(e^ψ on the gains) + Σ ψ_gain, written out by hand."""
    pp, prior = setup["pp"], setup["prior"]
    psi = pp.flatten(pp.params) + 0.1
    theta = setup["phi"](psi)
    n_gain = 2
    gain_slice = [i for i, n in enumerate(pp.param_names) if "gain" in n][0]
    offset = sum(p.numel() for p in pp.params[:gain_slice])
    by_hand = prior(theta) + psi[offset : offset + n_gain].sum()
    assert float(setup["prior_psi"](psi)) == pytest.approx(float(by_hand), rel=1e-12)


def test_modes_are_optimal(setup):
    for key in ("map_t", "map_p", "inv_t", "inv_p"):
        assert setup[key].grad_norm < 1e-6, (key, setup[key].grad_norm)


def test_ordinary_map_moves_invariant_map_does_not(setup):
    phi = setup["phi"]
    moved = float((phi(setup["map_p"].point) - setup["map_t"].point).norm())
    stayed = float((phi(setup["inv_p"].point) - setup["inv_t"].point).norm())
    scale = float(setup["inv_t"].point.norm())
    assert moved > 1e-2 * scale, moved  # the |det J| term shifts the ordinary MAP
    assert stayed < 1e-6 * scale, stayed  # limited by the optimizer's gradient tolerance


def test_riemannian_density_is_a_scalar(setup):
    """p̃_ψ(ψ) = p̃_θ(φ(ψ)) at arbitrary points, not only at the mode."""
    pt, pp, phi = setup["pt"], setup["pp"], setup["phi"]
    ll_t, ll_p = D.log_likelihood(pt), D.log_likelihood(pp)
    rt = D.riemannian_log_density(pt, lambda x: ll_t(x) + setup["prior"](x), ALPHA)
    rp = D.riemannian_log_density(pp, lambda x: ll_p(x) + setup["prior_psi"](x), ALPHA)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        psi = pp.flatten(pp.params) + 0.3 * torch.randn(pp.dim, generator=g, dtype=torch.float64)
        assert float(rp(psi)) == pytest.approx(float(rt(phi(psi))), rel=1e-10)


def test_laplace_evidence_is_invariant(setup):
    pt, pp = setup["pt"], setup["pp"]
    ll_t, ll_p = D.log_likelihood(pt), D.log_likelihood(pp)
    post_t = lambda x: ll_t(x) + setup["prior"](x)  # noqa: E731
    post_p = lambda x: ll_p(x) + setup["prior_psi"](x)  # noqa: E731
    zt = D.laplace_log_evidence(pt, post_t, setup["inv_t"].point, ALPHA)
    zp = D.laplace_log_evidence(pp, post_p, setup["inv_p"].point, ALPHA)
    assert zp == pytest.approx(zt, rel=1e-8)
    # the ordinary Laplace approximation (Lebesgue measure, each side's own MAP) is not invariant
    def ordinary(post, mode):
        A = -torch.func.hessian(post)(mode)
        return float(post(mode)) + 0.5 * mode.numel() * torch.log(torch.tensor(2 * torch.pi)).item() \
            - 0.5 * float(torch.linalg.slogdet(A)[1])
    ot = ordinary(post_t, setup["map_t"].point)
    op = ordinary(post_p, setup["map_p"].point)
    assert abs(op - ot) > 1e-3 * abs(ot)
    # the diagonal variant is invariant here too: exp acts elementwise, so J is diagonal
    zt_d = D.laplace_log_evidence(pt, post_t, setup["inv_t"].point, ALPHA, logdet="diag")
    zp_d = D.laplace_log_evidence(pp, post_p, setup["inv_p"].point, ALPHA, logdet="diag")
    assert zp_d == pytest.approx(zt_d, rel=1e-8)


def test_bad_input(setup):
    with pytest.raises(cd.ProblemError, match="cd.reparametrize"):
        D.pulled_back_log_density(setup["prior"], setup["pt"])
    with pytest.raises(cd.SolverError, match="dense' or 'diag"):
        D.laplace_log_evidence(setup["pt"], setup["prior"], setup["inv_t"].point, logdet="kfac")
    wn = cd.reparametrize(setup["pt"], cd.reparam.weight_norm(["lin.weight"]))
    with pytest.raises(cd.ProblemError, match="not a bijection"):
        D.pulled_back_log_density(setup["prior"], wn)
