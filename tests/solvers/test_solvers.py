"""Solvers on dense matrices with known spectra: Lanczos, trace, diagonal, SLQ log-det and density."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.solvers import Krylov, TorchSpace, eigsh, lanczos, slq, space
from curvdist.solvers.diag import hutchinson_diag, xdiag
from curvdist.solvers.space import Basis
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


class _ListSpace:
    """The plain VectorSpace interface only (no new_basis/sub_lincomb): lanczos keeps a list basis, as for the
    pipeline's sharded vectors. The reference for the preallocated path."""

    def __init__(self, dim):
        self.base = TorchSpace(dim, torch.float64)
        self.dim = dim

    def __getattr__(self, name):
        if name in ("new_basis", "sub_lincomb"):
            raise AttributeError(name)
        return getattr(self.base, name)


class _MSpace:
    """ℝ^d with ⟨x, y⟩ = xᵀMy wrapping a TorchSpace by delegation, like the queries' MetricSpace."""

    def __init__(self, base, M):
        self.base, self.M, self.dim = base, M, base.dim

    def dot(self, x, y):
        return self.base.dot(x, self.M @ y)

    def dots(self, xs, y):
        return self.base.dots(xs, self.M @ y) if len(xs) else np.zeros(0)

    def norm(self, x):
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def __getattr__(self, name):
        return getattr(self.base, name)


def test_basis_products_match_dense():
    """Basis over several blocks: dots (precise and coarse), subtract, lincomb, prefix views, against dense math."""
    d, dtype = 50, torch.float64
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, d, generator=g, dtype=dtype)
    y = torch.randn(d, generator=g, dtype=dtype)
    B = Basis(d, dtype, capacity=5, block_rows=3)
    for i, x in enumerate(X):
        B.append(x, 2.0 if i == 1 else 1.0)
    X[1] *= 2.0
    assert len(B) == 7 and [b.shape[0] for b in B._blocks] == [3, 2, 3]  # capacity 5, then block_rows
    np.testing.assert_allclose(torch.stack(list(B)).numpy(), X.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(B.dots(y), (X @ y).numpy(), rtol=1e-13)
    np.testing.assert_allclose(B.coarse().dots(y), (X @ y).numpy(), rtol=1e-13)
    c = np.linspace(-1.0, 1.0, 5)
    ref = (y - torch.as_tensor(c) @ X[:5]).numpy()
    np.testing.assert_allclose(B.subtract(c, y).numpy(), ref, rtol=1e-13, atol=1e-13)
    y2 = y.clone()
    assert B.subtract(c, y2, out=y2) is y2
    np.testing.assert_allclose(y2.numpy(), ref, rtol=1e-13, atol=1e-13)
    head = B[:4]
    assert len(head) == 4 and len(B) == 7
    np.testing.assert_allclose(head.dots(y), (X[:4] @ y).numpy(), rtol=1e-13)
    np.testing.assert_allclose(TorchSpace(d).lincomb(c[:4], head).numpy(), (torch.as_tensor(c[:4]) @ X[:4]).numpy(),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(B[-1].numpy(), X[-1].numpy())
    with pytest.raises(cd.SolverError, match="cannot append to a prefix view"):
        head.append(y)
    with pytest.raises(cd.SolverError, match="prefix slices"):
        B[1:3]
    with pytest.raises(cd.SolverError, match="flat vector of length 50"):
        B.append(torch.zeros(3, dtype=dtype))
    with pytest.raises(cd.SolverError, match="8 coefficients for a basis of 7 vectors"):
        B.subtract(np.ones(8), y)
    with pytest.raises(IndexError):
        B[7]


def test_basis_float32_dots_are_accurate_far_below_float32_rounding():
    """float32 rows and vector with same-sign entries (where float32 accumulation drifts most): the blocked dots
    agree with the float64 products of the same float32 numbers to 1e-8 relative, below the data's own rounding
    (ε₃₂ = 6e-8), where a float32 matrix-vector product over 10⁶ coordinates misses by more than 100× as much."""
    d = 1_000_000
    g = torch.Generator().manual_seed(1)
    X = torch.rand(3, d, generator=g)  # same-sign entries: float32 accumulation drifts
    y = torch.rand(d, generator=g)
    B = Basis(d, torch.float32, capacity=3)
    for x in X:
        B.append(x)
    exact = (X.double() @ y.double()).numpy()
    err = np.max(np.abs(B.dots(y) - exact) / exact)
    plain = np.max(np.abs((X @ y).double().numpy() - exact) / exact)
    assert err < 1e-8 and plain > 100 * err, (err, plain)
    assert TorchSpace(d, torch.float32).dot(X[0], y) == pytest.approx(exact[0], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_basis_dots_over_blocks_slices_and_a_ragged_tail(monkeypatch, dtype):
    """Several row blocks, several slices, a length that is no multiple of the summation block and a strided vector:
    every dot equals the float64 product of the same numbers (float16: products and sums in float64 scratch, to
    float64 rounding; float32: blocked summation, far below float32 rounding), relative to Σ|x_i y_i|."""
    monkeypatch.setattr(space, "DOT_SLICE", 1024)
    d, rows = 10_007, 5
    g = torch.Generator().manual_seed(4)
    X = torch.randn(rows, d, generator=g).to(dtype)
    y = torch.randn(d, generator=g).to(dtype)
    B = Basis(d, dtype, block_rows=2)  # blocks of 2, 2 and 1 rows
    for x in X:
        B.append(x)
    assert len(B._blocks) == 3
    exact = (X.double() @ y.double()).numpy()
    scale = (X.double().abs() @ y.double().abs()).numpy()
    err = np.max(np.abs(B.dots(y) - exact) / scale)
    assert err < (1e-14 if dtype == torch.float16 else 1e-8), err  # float32: below ε₃₂ = 6e-8
    assert np.array_equal(B[:3].dots(y), B.dots(y)[:3])
    strided = torch.empty(2 * d, dtype=dtype)
    strided[::2] = y
    assert np.array_equal(B.dots(strided[::2]), B.dots(y))  # a strided vector gives the same numbers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distance_equals_the_norm_of_the_difference(dtype):
    """‖x − y‖ without the temporary (float32: a slice at a time) is bitwise the norm of x − y, and agrees with the
    float64 difference of the same numbers to float64 rounding of the float32 differences."""
    d = 200_003  # not a multiple of the slice length
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    sp = TorchSpace(d, dtype)
    assert sp.distance(x, y) == sp.norm(x - y)
    exact = float(torch.linalg.vector_norm(x.double() - y.double()))
    assert sp.distance(x, y) == pytest.approx(exact, rel=1e-7 if dtype == torch.float32 else 1e-14)
    assert sp.distance(x, x) == 0.0


def _run(space, A, steps, **kw):
    return lanczos(lambda v: A @ v, space, space.random(11, "gaussian"), steps, **kw)


def test_preallocated_lanczos_equals_list_lanczos_with_restarts():
    """Rank-3 operator: breakdowns and restarts; the preallocated basis (several blocks) gives the list path's
    tridiagonal and Ritz values, and its basis is orthonormal."""
    lam = torch.zeros(D, dtype=torch.float64)
    lam[:3] = torch.tensor([4.0, 2.0, 1.0])
    A = spd_matrix(D, lam, seed=4)
    fast, ref = _run(TorchSpace(D), A, 40), _run(_ListSpace(D), A, 40)
    assert isinstance(fast.basis, Basis) and isinstance(ref.basis, list)
    assert len(fast.basis._blocks) == 2 and fast.restarts == ref.restarts >= 9
    np.testing.assert_allclose(fast.alphas, ref.alphas, atol=1e-12)
    np.testing.assert_allclose(fast.betas, ref.betas, atol=1e-12)
    Q = torch.stack(list(fast.basis))
    assert float((Q @ Q.T - torch.eye(len(Q), dtype=torch.float64)).abs().max()) < 1e-13
    theta, _ = fast.tridiagonal_eigh()
    np.testing.assert_allclose(np.sort(theta)[::-1][:4], [4.0, 2.0, 1.0, 0.0], atol=1e-12)


def test_lanczos_with_an_operator_returning_its_input():
    """A = I returning v itself: the orthogonalized vector must not be written into the basis row it aliases."""
    sp = TorchSpace(D)
    start = sp.random(3, "gaussian")
    st = lanczos(lambda v: v, sp, start, 5)
    np.testing.assert_allclose(st.alphas, np.ones(5), atol=1e-14)
    np.testing.assert_allclose(st.basis[0].numpy(), (start / start.norm()).numpy(), atol=1e-15)
    assert st.restarts == 4


def test_lanczos_resumes_from_a_list_checkpoint_and_from_its_own_state(decaying):
    """Interrupting after 7 steps and resuming — from a list of saved vectors (as the checkpoint file gives), from
    the live state, or from a read-only prefix view of a basis — reproduces the uninterrupted run."""
    A, _ = decaying
    sp = TorchSpace(D)
    full = _run(sp, A, 25)
    seen = {}

    class Interrupt(Exception):
        pass

    def crash(st):
        if len(st.alphas) == 7:
            seen["live"] = st
            seen["saved"] = Krylov(list(st.alphas), list(st.betas), [q.clone() for q in st.basis], st.matvecs,
                                   st.restarts)
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(sp, A, 25, on_step=crash)
    live = seen["live"]
    assert len(live.alphas) == 7 and len(live.basis) == 8
    view = Krylov(list(live.alphas), list(live.betas), live.basis[:8], live.matvecs, live.restarts)
    for state in (seen["saved"], view, live):
        resumed = lanczos(lambda v: A @ v, sp, None, 25, state=state)
        assert isinstance(resumed.basis, Basis) and resumed.matvecs == 25
        np.testing.assert_allclose(resumed.alphas, full.alphas, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(resumed.betas, full.betas, rtol=1e-12, atol=1e-14)
    stopped = _run(sp, A, 25, stop=lambda st: len(st.alphas) == 7)
    with pytest.raises(cd.SolverError, match="cannot resume Lanczos: the state has 7 steps but 7 basis vectors"):
        lanczos(lambda v: A @ v, sp, None, 25, state=stopped)


def test_lanczos_in_a_metric_inner_product(decaying):
    """Lanczos on M⁻¹A in the M-inner product (the space wraps a TorchSpace, as the queries' MetricSpace does):
    the preallocated basis takes its products through the wrapper, giving the pencil's eigenvalues."""
    import scipy.linalg

    A, _ = decaying
    lam_m = torch.linspace(0.5, 3.0, D, dtype=torch.float64)
    M = spd_matrix(D, lam_m, seed=5)
    Minv = torch.linalg.inv(M)
    r = eigsh(lambda v: Minv @ (A @ v), _MSpace(TorchSpace(D), M), k=3, tol=1e-10)
    assert r.converged
    ref = scipy.linalg.eigh(A.numpy(), M.numpy(), eigvals_only=True)[::-1][:3]
    np.testing.assert_allclose(r.values, ref, rtol=1e-9)


def test_float32_lanczos_keeps_its_basis_orthonormal():
    """float32, d = 10⁵, 30 steps on diag(λ) with top eigenvalues 10, 5, 3: the basis stays float32 in one
    preallocated block, orthonormal to ~ε₃₂ (a float32 second pass would leave ~4·10⁻⁶), top Ritz values accurate."""
    d = 100_000
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(d, generator=g)
    lam[:3] = torch.tensor([10.0, 5.0, 3.0])
    sp = TorchSpace(d, torch.float32)
    st = lanczos(lambda v: lam * v, sp, sp.random(1, "gaussian"), 30)
    assert isinstance(st.basis, Basis) and st.basis.dtype == torch.float32 and len(st.basis._blocks) == 1
    Q = torch.stack(list(st.basis)).double()
    assert float((Q @ Q.T - torch.eye(30, dtype=torch.float64)).abs().max()) < 1e-6
    theta, _ = st.tridiagonal_eigh()
    np.testing.assert_allclose(np.sort(theta)[::-1][:3], [10.0, 5.0, 3.0], rtol=1e-6)


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


class _LiveSpace(TorchSpace):
    """A TorchSpace that counts the vectors it made (and the products made) that are still alive."""

    def __init__(self) -> None:
        super().__init__(D, torch.float64)
        self.live = self.peak = 0

    def made(self, t: torch.Tensor) -> torch.Tensor:
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._gone)
        return t

    def _gone(self) -> None:
        self.live -= 1


def _counted(method):
    """``method``, counting the vector it returns unless that is the ``out`` it was given (written in place)."""
    def counted(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        return result if result is kwargs.get("out") else self.made(result)

    return counted


for _name in ("axpy", "scale", "zeros", "random", "mul", "lincomb", "sub_lincomb"):
    setattr(_LiveSpace, _name, _counted(getattr(TorchSpace, _name)))


@pytest.mark.parametrize("estimator, budget, most, at_later_products", [
    (hutchinson, 6, 2, 1),  # the probe; its product is made beside it
    (hutchpp, 9, 2 * 3 + 2, 3 + 1),  # k = 3: sketch and Q side by side while orthonormalizing, then Q and one probe
    (hutchpp, 4, 1 + 2, 1 + 1),  # k = 1: Q, and z and Qᵀz's combination while z − Q(Qᵀz) is written into z
    (xtrace, 8, 3 * 4 + 2, 2 * 4),  # m = 4: Ω, AΩ and Q while orthonormalizing, then Ω, Q and one product
])
def test_trace_estimators_let_go_of_the_vectors_they_no_longer_use(decaying, estimator, budget, most,
                                                                    at_later_products):
    """Counted live vectors (module docstring of curvdist.solvers.trace: at 774M in 4 stages one is 0.9 GB a stage):
    the sketch once orthonormalized, A q once qᵀAq is taken, and every probe with its product before the next."""
    A, _ = decaying
    space, live_at_product = _LiveSpace(), []

    def apply(v):
        live_at_product.append(space.live)
        return space.made(A @ v)

    est = estimator(apply, space, budget, seed=2)
    assert est.value == estimator(lambda v: A @ v, _space(), budget, seed=2).value
    assert space.peak <= most, space.peak
    later = live_at_product[budget // (3 if estimator is hutchpp else 2):]
    assert max(later) <= at_later_products, live_at_product
    assert space.live == 0


class _BasesOffMemory(TorchSpace):
    """A TorchSpace that says its bases live off the working memory, and records the bases made."""

    bases_off_memory = True

    def __init__(self) -> None:
        super().__init__(D, torch.float64)
        self.bases: list[Basis] = []

    def new_basis(self, capacity=None):
        self.bases.append(super().new_basis(capacity))
        return self.bases[-1]


class _LiveBasesOffMemory(_LiveSpace):
    """A counting space (_LiveSpace) whose bases live off the working memory."""

    bases_off_memory = True


@pytest.mark.parametrize("matvecs", [4, 9])
def test_hutchpp_keeps_q_as_a_basis_where_the_space_keeps_bases_off_memory(decaying, matvecs):
    """With ``bases_off_memory`` (pipeline stages with basis_on_disk) Hutch++ holds Q in a basis of the space (there,
    rows in files, out of the stages' resident memory between passes) and gives the list-held estimate to
    rounding: the same probes and products, Q's dots and subtractions taken by the basis."""
    A, _ = decaying
    space = _BasesOffMemory()
    est = hutchpp(lambda v: A @ v, space, matvecs, seed=3)
    ref = hutchpp(lambda v: A @ v, _space(), matvecs, seed=3)
    assert [len(b) for b in space.bases] == [matvecs // 3]
    assert est.matvecs == ref.matvecs
    assert np.allclose(est.samples, ref.samples, rtol=1e-12, atol=1e-12 * abs(ref.value))
    assert est.value == pytest.approx(ref.value, rel=1e-12)
    counted, live_at_product = _LiveBasesOffMemory(), []

    def apply(v):
        live_at_product.append(counted.live)
        return counted.made(A @ v)

    hutchpp(apply, counted, matvecs, seed=3)
    # after the sketch, only the probe being multiplied is a vector (Q is in the basis): none of Q's vectors linger
    assert max(live_at_product[matvecs // 3:]) <= 1, live_at_product


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


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dim", [5, 2**20 + 3, 2**21 + 40, 3 * 2**20 - 7])
def test_random_segments_equal_slices_of_the_single_draw(kind, dim, monkeypatch):
    """Pieces of the streamed random vector are entry for entry the pieces of one draw of the whole vector
    (the stream is drawn in chunks; here chunks of 2^20 and, below, of 2^16 + 16), in any order of segments."""
    full = space.random_flat(dim, 11, kind, torch.float64)
    segs = [(dim - 2, 2), (0, 1), (2, 1)] if dim < 1000 else [(dim - 4, 4), (0, 3), (dim // 2 - 100, 300),
                                                                (dim // 3, 1)]
    want = torch.cat([full[a:a + n] for a, n in segs])
    assert torch.equal(space.random_segments(dim, 11, kind, torch.float64, segs), want)
    monkeypatch.setattr(space, "STREAM_CHUNK", 2**16 + 16)
    assert torch.equal(space.random_segments(dim, 11, kind, torch.float64, segs), want)
    assert torch.equal(space.random_segments(dim, 11, kind, torch.float32, [(0, dim)]), full.float())
    with pytest.raises(cd.SolverError, match="beyond the vector's length"):
        space.random_segments(dim, 11, kind, torch.float64, [(dim - 1, 2)])
