"""Thick-restart Lanczos on dense matrices with known spectra: the wanted eigenvalues to tolerance with a basis of at
most ``max_basis`` vectors (counted), through ``cd.eigs`` on a curvature operator, and its refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.errors import SolverError
from curvdist.solvers import TorchSpace, eigsh, eigsh_restarted
from curvdist.solvers.space import Basis
from tests.cases import CASES, make_problem, spd_matrix
from tests.dense import dense_hessian

D = 300


@pytest.fixture(scope="module")
def clustered():
    """An indefinite spectrum whose extreme eigenvalues are close together (many restarts to separate them)."""
    g = torch.Generator().manual_seed(3)
    lam = torch.cat([torch.tensor([10.0, 9.5, 9.2, -8.0, -7.9], dtype=torch.float64),
                     torch.rand(D - 5, generator=g, dtype=torch.float64) * 12 - 6])
    return spd_matrix(D, lam, seed=4), lam


class _CountingSpace(TorchSpace):
    """A TorchSpace whose bases record the most vectors they ever held and the rows they allocated."""

    def __init__(self) -> None:
        super().__init__(D, torch.float64)
        self.bases: list[Basis] = []

    def new_basis(self, capacity: int | None = None) -> Basis:
        space = self

        class Counted(Basis):
            most = 0

            def append(self, v: Any, scale: float = 1.0) -> None:
                super().append(v, scale)
                Counted.most = max(Counted.most, len(self))

        basis = Counted(self.dim, self.dtype, self.device, capacity)
        space.bases.append(basis)
        return basis


class _ListSpace:
    """The same space without preallocated bases: the restart forms the Ritz vectors as new vectors."""

    def __init__(self) -> None:
        self.inner = TorchSpace(D, torch.float64)

    def __getattr__(self, name: str) -> Any:
        if name in ("new_basis", "sub_lincomb"):
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_restarted_lanczos_finds_the_wanted_eigenvalues_within_its_basis(clustered, which):
    A, lam = clustered
    space = _CountingSpace()
    r = eigsh_restarted(lambda v: A @ v, space, k=3, which=which, max_basis=9, tol=1e-10, maxiter=3000)
    key = {"largest": -lam, "smallest": lam, "magnitude": -lam.abs()}[which]
    want = lam[torch.argsort(key)[:3]].numpy()
    assert r.converged
    np.testing.assert_allclose(np.sort(r.values), np.sort(want), rtol=1e-9)
    assert r.matvecs > 9  # it restarted
    (basis,) = space.bases
    assert type(basis).most <= 9 and sum(b.shape[0] for b in basis._blocks) <= 9


def test_restart_without_preallocated_bases_and_with_vectors(clustered):
    A, _ = clustered
    r = eigsh_restarted(lambda v: A @ v, _ListSpace(), k=2, max_basis=8, tol=1e-10, maxiter=3000,
                        return_vectors=True)
    assert r.converged
    np.testing.assert_allclose(r.values, [10.0, 9.5], rtol=1e-9)
    for value, x in zip(r.values, r.vectors):
        assert torch.linalg.vector_norm(A @ x - value * x) <= 1e-8 * 10 * torch.linalg.vector_norm(x)


def test_eigs_with_a_basis_budget_equals_the_dense_hessian():
    case = CASES["mlp"]()
    model = case.model()
    H = cd.operator(make_problem(case, model=model), "hessian")
    budget = cd.eigs(H, k=2, tol=1e-10, max_basis=6, maxiter=2000)
    assert budget.converged and budget.info["max_basis"] == 6
    dense = torch.linalg.eigvalsh(dense_hessian(model, case.loss, case.X, case.y, "mean")).numpy()
    np.testing.assert_allclose(budget.value, dense[::-1][:2], rtol=1e-8)


def test_refusals(mlp_problem, tmp_path):
    A = torch.eye(D, dtype=torch.float64)
    with pytest.raises(SolverError, match="at least k \\+ 2"):
        eigsh_restarted(lambda v: A @ v, TorchSpace(D, torch.float64), k=3, max_basis=4)
    with pytest.raises(SolverError, match="keep"):
        eigsh_restarted(lambda v: A @ v, TorchSpace(D, torch.float64), k=2, max_basis=8, keep=7)
    with pytest.raises(SolverError, match="max_basis must be an integer"):
        eigsh_restarted(lambda v: A @ v, TorchSpace(D, torch.float64), k=1, max_basis=5.5)
    with pytest.raises(SolverError, match="cannot be combined with max_basis"):
        cd.eigs(cd.operator(mlp_problem, "ggn"), max_basis=5, checkpoint=tmp_path / "x.pt")
    # the plain solver is untouched by the new option
    assert eigsh(lambda v: A @ v, TorchSpace(D, torch.float64), k=1).converged
