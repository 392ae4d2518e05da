"""Problem construction, data forms, and bad input: each a clear curvdist error, none a torch traceback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvdist as cd
from tests import dense
from tests.cases import CASES, make_problem


@pytest.fixture
def mlp_case():
    return CASES["mlp"]()


def test_data_forms_agree(mlp_case):
    c = mlp_case
    model = c.model()
    ds = TensorDataset(c.X, c.y)
    forms = [
        (c.X, c.y),
        ds,
        DataLoader(ds, batch_size=4),
        [(c.X[i : i + 4], c.y[i : i + 4]) for i in range(0, len(c.X), 4)],
    ]
    mats = []
    for data in forms:
        p = cd.Problem(model, c.loss, data, batch_size=4 if data is ds or isinstance(data, tuple) else None)
        assert p.num_samples == len(c.X)
        mats.append(cd.operator(p, "hessian").to_dense())
    for m in mats[1:]:
        torch.testing.assert_close(m, mats[0], rtol=1e-12, atol=1e-14)


def test_mean_is_sum_over_n(mlp_case):
    pm, ps = make_problem(mlp_case, "mean"), make_problem(mlp_case, "sum")
    torch.testing.assert_close(cd.operator(ps, "ggn").to_dense() / len(mlp_case.X), cd.operator(pm, "ggn").to_dense())
    assert pm.value() == pytest.approx(ps.value() / len(mlp_case.X), rel=1e-12)


def test_gradient_matches_autograd(mlp_case):
    model = mlp_case.model()
    p = make_problem(mlp_case, model=model)
    loss = nn.functional.cross_entropy(model(mlp_case.X), mlp_case.y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(p.gradient(), expected):
        torch.testing.assert_close(a, b)
    assert cd.grad_norm(p).value == pytest.approx(sum(float((g**2).sum()) for g in expected), rel=1e-10)


def test_nan_in_data_is_refused(mlp_case):
    X = mlp_case.X.clone()
    X[3, 1] = float("nan")
    with pytest.raises(cd.DataError, match="batch 0: X contains NaN"):
        cd.Problem(mlp_case.model(), "cross_entropy", (X, mlp_case.y), batch_size=5)


def test_inf_in_targets_is_refused():
    c = CASES["mlp_mse"]()
    y = c.y.clone()
    y[-1, 0] = float("inf")
    with pytest.raises(cd.DataError, match="y contains NaN or inf"):
        cd.Problem(c.model(), "mse", (c.X, y), batch_size=4)


def test_nan_loss_from_parameters_is_refused(mlp_case):
    model = mlp_case.model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(cd.NonFiniteError, match="NaN or inf"):
        cd.Problem(model, "cross_entropy", (mlp_case.X, mlp_case.y))


def test_empty_data_is_refused(mlp_case):
    with pytest.raises(cd.DataError, match="empty"):
        cd.Problem(mlp_case.model(), "cross_entropy", [])
    with pytest.raises(cd.DataError, match="empty"):
        cd.Problem(mlp_case.model(), "cross_entropy", (mlp_case.X[:0], mlp_case.y[:0]), batch_size=2)


def test_generator_data_is_refused(mlp_case):
    gen = ((mlp_case.X, mlp_case.y) for _ in range(1))
    with pytest.raises(cd.DataError, match="one-shot iterator"):
        cd.Problem(mlp_case.model(), "cross_entropy", gen)


def test_bad_targets_are_refused(mlp_case):
    with pytest.raises(cd.DataError, match="integer class targets"):
        cd.Problem(mlp_case.model(), "cross_entropy", (mlp_case.X, mlp_case.y.double()))
    with pytest.raises(cd.DataError, match=r"targets must lie in \[0, 3\]"):
        cd.Problem(mlp_case.model(), "cross_entropy", (mlp_case.X, mlp_case.y + 10))
    with pytest.raises(cd.DataError, match="mse expects targets of the output's shape"):
        cd.Problem(mlp_case.model(), "mse", (mlp_case.X, mlp_case.y.double()))


def test_bad_arguments_are_refused(mlp_case):
    m = mlp_case.model()
    data = (mlp_case.X, mlp_case.y)
    with pytest.raises(cd.ProblemError, match="unknown parameter names"):
        cd.Problem(m, "cross_entropy", data, params=["0.weigth"])
    with pytest.raises(cd.UnknownNameError, match="unknown loss 'hinge'; choose one of: cross_entropy, mse"):
        cd.Problem(m, "hinge", data)
    with pytest.raises(cd.ProblemError, match="reduction"):
        cd.Problem(m, "cross_entropy", data, reduction="avg")
    with pytest.raises(cd.ProblemError, match="torch.nn.Module"):
        cd.Problem(lambda x: x, "cross_entropy", data)
    with pytest.raises(cd.DataError, match="needs a batch_size"):
        cd.Problem(m, "cross_entropy", TensorDataset(*data))


def test_dropout_in_train_mode_is_named():
    c = CASES["mlp"]()
    model = nn.Sequential(nn.Linear(8, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 4)).double().train()
    p = cd.Problem(model, "cross_entropy", (c.X, c.y))
    with pytest.raises(cd.NonDeterministicError, match=r"dropout module '1' in train mode"):
        cd.operator(p, "hessian")
    model.eval()
    cd.operator(p, "hessian")  # deterministic now


def test_batchnorm_in_train_mode_is_named():
    c = CASES["cnn"]()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10)).double().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(cd.NonDeterministicError, match=r"BatchNorm module '1' in train mode"):
        cd.Problem(model, "cross_entropy", (c.X, c.y), batch_size=4)
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k
    model.eval()
    G = cd.operator(cd.Problem(model, "cross_entropy", (c.X, c.y), batch_size=4), "ggn").to_dense()
    assert torch.allclose(G, G.T)


def test_shuffling_loader_is_named_for_sampled_fisher(mlp_case):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(mlp_case.X, mlp_case.y), batch_size=3, shuffle=True)
    p = cd.Problem(mlp_case.model(), "cross_entropy", loader)
    with pytest.raises(cd.NonDeterministicError, match="shuffles"):
        cd.operator(p, "fisher_mc")


class _InPlaceCounter(nn.Module):
    """A model whose forward pass mutates its own state (a buffer), which no transform can differentiate."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x)


def test_impure_forward_is_a_clear_error(mlp_case):
    """torch.func refuses the buffer update (the GGN's jvp); the Hessian's autograd modes differentiate through it,
    and since the counter does not reach the output their product is the Linear layer's exact Hessian."""
    p = cd.Problem(_InPlaceCounter().double(), "cross_entropy", (mlp_case.X, mlp_case.y))
    with pytest.raises(cd.AutodiffError, match="ggn product failed inside torch on batch 0"):
        cd.operator(p, "ggn")
    model = p.model
    H = cd.operator(p, "hessian").to_dense()
    f, theta = dense.outputs_fn(model, mlp_case.X)
    truth = dense.autograd_hessian(lambda th: torch.nn.functional.cross_entropy(f(th), mlp_case.y), theta)
    torch.testing.assert_close(H, truth, rtol=1e-10, atol=1e-12)
