"""Solvers on dense matrices with known spectra: Lanczos, trace, diagonal, SLQ log-det and density."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.solvers import TorchSpace, eigsh, slq
from curvdist.solvers.diag import hutchinson_diag, xdiag
from curvdist.solvers.trace import hutchinson, hutchpp, xtrace
from tests.cases import spd_matrix

D = 120


@pytest.fixture(scope="module")
def decaying():
    """SPD matrix with eigenvalues 1/k^1.5 plus a few outliers (a curvature-like spectrum)."""
    lam = torch.cat([torch.tensor([40.0, 25.0, 12.0, 7.0, 5.0], dtype=torch.float64),
                     1.0 / torch.arange(1, D - 4, dtype=torch.float64) ** 1.5])
    return spd_matrix(D, lam, seed=1), lam


@pytest.fixture(scope="module")
def indefinite():
    lam = torch.linspace(-3.0, 10.0, D, dtype=torch.float64) ** 3 / 100
    return spd_matrix(D, lam, seed=2), lam


def _space():
    return TorchSpace(D, torch.float64)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_matches_eigvalsh(indefinite, which):
    A, lam = indefinite
    r = eigsh(lambda v: A @ v, _space(), k=4, which=which, tol=1e-10)
    s = torch.linalg.eigvalsh(A).numpy()
    expected = {"largest": np.sort(s)[::-1][:4], "smallest": np.sort(s)[:4],
                "magnitude": s[np.argsort(-np.abs(s))][:4]}[which]
    assert r.converged
    np.testing.assert_allclose(r.values, expected, rtol=1e-9, atol=1e-10 * np.abs(s).max())
    assert r.matvecs == r.iterations < D


def test_lanczos_eigenvectors_and_residuals(decaying):
    A, _ = decaying
    r = eigsh(lambda v: A @ v, _space(), k=3, tol=1e-10, return_vectors=True)
    for value, vec, res in zip(r.values, r.vectors, r.residuals):
        assert abs(float(vec.norm()) - 1) < 1e-10
        true_res = float((A @ vec - value * vec).norm())
        assert true_res <= 1e-8 * 40
        assert true_res == pytest.approx(res, abs=1e-9)


def test_lanczos_finds_repeated_eigenvalues():
    """Rank-2 matrix in 120 dimensions: the Krylov space breaks down after 3 steps; restarts find the zeros."""
    lam = torch.zeros(D, dtype=torch.float64)
    lam[:2] = torch.tensor([3.0, 1.0])
    A = spd_matrix(D, lam, seed=3)
    r = eigsh(lambda v: A @ v, _space(), k=4, tol=1e-10)
    np.testing.assert_allclose(r.values, [3.0, 1.0, 0.0, 0.0], atol=1e-10)
    assert r.converged


def test_lanczos_bad_input():
    A = torch.eye(5, dtype=torch.float64)
    sp = TorchSpace(5)
    with pytest.raises(cd.SolverError, match="k=6 eigenvalues requested but the operator has dimension 5"):
        eigsh(lambda v: A @ v, sp, k=6)
    with pytest.raises(cd.UnknownNameError, match="unknown eigenvalue selection 'which' 'top'; choose one of: largest"):
        eigsh(lambda v: A @ v, sp, k=1, which="top")


def _errors(estimator, A, true, budget, seeds):
    est = [estimator(lambda v: A @ v, _space(), budget, seed=s) for s in seeds]
    return np.array([e.value for e in est]) - true, np.array([e.stderr for e in est])


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp, xtrace])
def test_trace_estimators_converge(decaying, estimator):
    A, lam = decaying
    true = float(lam.sum())
    small, _ = _errors(estimator, A, true, 12, range(20))
    large, _ = _errors(estimator, A, true, 96, range(20))
    rms_small, rms_large = np.sqrt(np.mean(small**2)), np.sqrt(np.mean(large**2))
    # 8x the budget: Hutchinson's error shrinks ~sqrt(8)=2.8x, Hutch++/XTrace faster on this decaying spectrum
    assert rms_large < rms_small / 2.0, (rms_small, rms_large)
    if estimator is hutchinson:  # Rademacher variance 2(‖A‖_F² − Σ A_ii²) per probe (Hutchinson 1989)
        sd = np.sqrt(2 * (float((A**2).sum()) - float((torch.diagonal(A) ** 2).sum())) / 96)
        assert rms_large < 1.5 * sd, (rms_large, sd)
    else:  # the outliers are captured by the sketch
        assert rms_large < 0.02 * true, (rms_large, true)


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp, xtrace])
def test_trace_stderr_is_calibrated(decaying, estimator):
    A, lam = decaying
    true = float(lam.sum())
    err, se = _errors(estimator, A, true, 60, range(100))
    covered = np.mean(np.abs(err) <= 2 * se)
    assert covered >= 0.8, covered  # nominal ~95%; the stderr itself is estimated from the same probes
    assert np.all(se > 0)


def test_xtrace_equals_leave_one_out_definition(decaying):
    """The Gram-matrix formula against the definition with explicit leave-one-out projections."""
    A, _ = decaying
    m = 6
    est = xtrace(lambda v: A @ v, _space(), 2 * m, seed=5, probe="gaussian")
    sp = _space()
    from curvdist.solvers.space import probe_seeds

    Om = torch.stack([sp.random(s, "gaussian") for s in probe_seeds(5, m)], 1)
    Y = A @ Om
    samples = []
    for i in range(m):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], 1))
        P = Qi @ Qi.T
        w = Om[:, i] - P @ Om[:, i]
        samples.append(float(torch.trace(Qi.T @ A @ Qi) + w @ A @ w))
    np.testing.assert_allclose(est.samples, samples, rtol=1e-9)
    assert est.value == pytest.approx(np.mean(samples), rel=1e-12)


def test_xtrace_is_exact_on_low_rank():
    lam = torch.zeros(D, dtype=torch.float64)
    lam[:3] = torch.tensor([5.0, 2.0, 1.0])
    A = spd_matrix(D, lam, seed=4)
    e = xtrace(lambda v: A @ v, _space(), 20, seed=0)
    assert e.value == pytest.approx(8.0, rel=1e-10)
    assert e.stderr == 0.0


@pytest.mark.parametrize("estimator", [hutchinson_diag, xdiag])
def test_diagonal_estimators_converge(decaying, estimator):
    A, _ = decaying
    d = torch.diagonal(A)
    errs = [float((estimator(lambda v: A @ v, _space(), b, seed=0).value - d).norm()) for b in (12, 120)]
    assert errs[1] < errs[0] / 2.5, errs
    e = estimator(lambda v: A @ v, _space(), 120, seed=1)
    covered = float(((e.value - d).abs() <= 2 * e.stderr).double().mean())
    assert covered >= 0.8, covered


def test_slq_logdet_and_density(decaying):
    A, lam = decaying
    sp = _space()
    q = slq.quadrature(lambda v: A @ v, sp, probes=30, steps=40, seed=0)
    value, err, _ = slq.logdet(q)
    true = float(torch.log(lam).sum())
    assert abs(value - true) < 3 * err + 1e-6 * abs(true), (value, true, err)
    assert abs(value - true) < 0.05 * abs(true)
    grid, phi, sigma = slq.density(q, 4000)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    # the mass above 3.0 is the 5 outliers out of 120 eigenvalues
    assert np.trapezoid(phi[grid > 3.0], grid[grid > 3.0]) == pytest.approx(5 / D, abs=0.03)


def test_logdet_refuses_indefinite(indefinite):
    A, _ = indefinite
    q = slq.quadrature(lambda v: A @ v, _space(), probes=2, steps=30)
    with pytest.raises(cd.NotPositiveDefiniteError, match="add damping"):
        slq.logdet(q)


def test_budgets_are_validated(decaying):
    A, _ = decaying
    with pytest.raises(cd.SolverError, match="xtrace needs a budget of at least 4"):
        xtrace(lambda v: A @ v, _space(), 3)
    with pytest.raises(cd.SolverError, match="probe kind"):
        hutchinson(lambda v: A @ v, _space(), 3, probe="sphere")
