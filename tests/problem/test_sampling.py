"""Monte-Carlo labels keyed by the global sample index (:mod:`curvdist.problem.sampling`): sampled metrics and
operators are functions of the data, not of the batching or of how the data are split into shards.

Ground truth for the split: one process on all the data (an independent run of the same code on a different
split must give the same numbers, to rounding); for the draws: the distributions' known moments."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import curvdist as cd
from curvdist.geometry.metrics.kfac import kfac_sums, normalized_factors
from curvdist.problem.reducers import tree_sum
from curvdist.problem.sampling import SampleKeys, categorical, gaussian
from tests.cases import CASES
from tests.problem.two_ranks import STRUCTURED, rows


def test_keyed_uniforms_depend_on_the_global_index_only() -> None:
    whole = SampleKeys(seed=3, first=0).uniform(4, 10, 6)
    part = SampleKeys(seed=3, first=4).uniform(4, 3, 6)
    assert torch.equal(whole[:, 4:7], part)
    assert not torch.equal(SampleKeys(seed=4, first=0).uniform(4, 10, 6), whole)
    assert float(whole.min()) > 0 and float(whole.max()) < 1
    u = SampleKeys(seed=0, first=0).uniform(1, 200_000).reshape(-1)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, rel=0.02)


def test_inverse_cdf_and_box_muller_draw_the_right_distributions() -> None:
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.0, 0.3]], dtype=torch.float64)
    labels = categorical(p, SampleKeys(0, 0).uniform(40_000, 2))
    freq0 = torch.bincount(labels[:, 0], minlength=4).double() / 40_000
    freq1 = torch.bincount(labels[:, 1], minlength=4).double() / 40_000
    torch.testing.assert_close(freq0, p[0], rtol=0, atol=0.01)
    torch.testing.assert_close(freq1, p[1], rtol=0, atol=0.01)
    assert int(freq1[1:3].sum()) == 0  # zero-probability classes are never drawn
    z = gaussian(SampleKeys(1, 0), 2, (20_000, 3))
    assert float(z.mean()) == pytest.approx(0.0, abs=0.02) and float(z.std()) == pytest.approx(1.0, abs=0.02)


def _problem(case_name: str, lo: int, hi: int, batch_size: int, micro: int | None = None) -> cd.Problem:
    case = CASES[case_name]()
    return cd.Problem(case.model(), case.loss, (case.X[lo:hi], case.y[lo:hi]), batch_size=batch_size,
                      reduction="sum", micro_batch_size=micro, sample_offset=lo)


def _shard_sum(case_name: str, statistic) -> tuple[object, object]:  # type: ignore[no-untyped-def]
    """The statistic of one process on all samples, and the sum over two shards (other batch sizes)."""
    n = CASES[case_name]().X.shape[0]
    whole = statistic(_problem(case_name, 0, n, batch_size=4))
    cut = n // 2 + 1
    parts = [statistic(_problem(case_name, 0, cut, batch_size=3, micro=2)),
             statistic(_problem(case_name, cut, n, batch_size=5))]
    return whole, tree_sum(parts)


@pytest.mark.parametrize("case_name", ["mlp", "mlp_mse", "cnn", "token_transformer"])
def test_sampled_diagonal_is_the_same_on_any_split(case_name: str) -> None:
    whole, split = _shard_sum(case_name, lambda p: cd.metric(p, "diag_fisher_mc", 0.0 + 1e-9, mc_samples=2,
                                                             seed=7).diagonal)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case_name", ["mlp", "transformer"])
def test_sampled_kronecker_factors_are_the_same_on_any_split(case_name: str) -> None:
    def sums(p: cd.Problem):  # type: ignore[no-untyped-def]
        return kfac_sums(p, mc_samples=2, seed=5)

    (G1, A1), (G2, A2) = _shard_sum(case_name, sums)
    names = CASES[case_name]().model().state_dict().keys()
    p = _problem(case_name, 0, 1, 1)
    F1 = normalized_factors(p.param_names, G1, A1, 1.0, 1)
    F2 = normalized_factors(p.param_names, G2, A2, 1.0, 1)
    assert set(F1) <= set(names)
    for name in F1:
        for a, b in zip(F1[name], F2[name]):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


def test_sampled_fisher_products_are_the_same_on_any_split() -> None:
    n = CASES["mlp"]().X.shape[0]
    whole = _problem("mlp", 0, n, batch_size=4)
    v = torch.randn(whole.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = cd.operator(whole, "fisher_mc", mc_samples=3, seed=2).apply_vector(v)
    parts = [_problem("mlp", 0, 6, batch_size=2), _problem("mlp", 6, n, batch_size=7, micro=3)]
    got = sum(cd.operator(p, "fisher_mc", mc_samples=3, seed=2).apply_vector(v) for p in parts)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    other_seed = cd.operator(whole, "fisher_mc", mc_samples=3, seed=3).apply_vector(v)
    assert not torch.allclose(other_seed, expected)


def test_sample_offset_is_validated_and_shards_of_a_spec_know_theirs() -> None:
    case = CASES["mlp"]()
    with pytest.raises(cd.DataError, match="sample_offset"):
        cd.Problem(case.model(), case.loss, (case.X, case.y), sample_offset=-1)
    spec = cd.ProblemSpec(model_factory="curvdist.zoo:mlp",
                          model_kwargs={"in_features": 64, "hidden": [3], "out_features": 10},
                          data_factory="curvdist.zoo:digits", data_kwargs={"n": 10}, loss="cross_entropy",
                          batch_size=4)
    shards = [spec.build(shard=i, shards=3) for i in range(3)]
    assert [s.sample_offset for s in shards] == [0, 3, 7]
    assert [s.first_sample(0) for s in shards] == [0, 3, 7] and shards[2].first_sample(0) == 7


# ---------------------------------------------------------------------------------------------- two ranks (gloo)
def test_sampled_metrics_on_two_ranks_equal_one_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """tests/problem/two_ranks.py under torchrun (2 gloo ranks, each its contiguous share of the batch)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(_free_port()), str(Path(__file__).with_name("two_ranks.py")), str(tmp_path / "store"),
                           str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    case = CASES["mlp"]()
    one = cd.Problem(case.model(), case.loss, (case.X, case.y), batch_size=13)
    torch.testing.assert_close(got["kfac"], cd.metric(one, "kfac", 1e-3, mc_samples=2, seed=5).to_dense(),
                               rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got["diag"], cd.metric(one, "diag_fisher_mc", 1e-3, mc_samples=2, seed=7).diagonal,
                               rtol=1e-10, atol=1e-14)
    expected = sum(rows(r).T @ rows(r) for r in range(2))
    assert isinstance(got["mixed"], torch.Tensor) and got["mixed"].ndim == 2
    torch.testing.assert_close(got["mixed"], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["gathered"], expected, rtol=1e-12, atol=1e-14)
    # structured factors (rows gathered over the ranks, diagonals summed) equal one process too
    tokens = CASES["token_transformer"]()
    one = cd.Problem(tokens.model(), tokens.loss, (tokens.X, tokens.y), batch_size=6)
    M = cd.metric(one, "kfac", 1e-3, mc_samples=2, seed=3, structured_above=STRUCTURED)
    # (a factor whose rows outnumber its dimension is densified: in one process the head's is, on each rank not)
    assert "head.weight" in got["structured"] and "head.weight" not in [b.name for b in M.blocks if b.structured]
    torch.testing.assert_close(got["kfac_structured"], M.to_dense(), rtol=1e-10, atol=1e-13)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
