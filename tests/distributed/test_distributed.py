"""Ray backends equal the local backend: data mode (1, 2 workers) and pipeline mode (2, 3 stages), on an MLP and
the CNN, for Hessian and GGN eigenvalues, traces and log-dets (same seeds) and an invariant query with a metric;
faults, resume, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import curvdist as cd
from curvdist.distributed.backend import RayBackend
from curvdist.distributed.data_parallel import WorkerPool
from curvdist.distributed.pipeline import PipelineMetric, PipelineOperator, StagePool
from curvdist.problem.spec import ProblemSpec

REL = 1e-10

SPECS = {
    "mlp": ProblemSpec(model_factory="curvdist.zoo:mlp",
                       model_kwargs={"in_features": 64, "hidden": [5, 4], "out_features": 10, "seed": 1},
                       data_factory="curvdist.zoo:digits", data_kwargs={"n": 60, "dtype": "float64"},
                       batch_size=30, loss="cross_entropy"),
    "cnn": ProblemSpec(model_factory="curvdist.zoo:cnn", model_kwargs={"channels": [2, 2], "seed": 2},
                       data_factory="curvdist.zoo:digits",
                       data_kwargs={"n": 40, "shape": "image", "dtype": "float64"},
                       batch_size=40, loss="cross_entropy"),
}


def _close(a, b, rel=REL):
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    np.testing.assert_allclose(b, a, rtol=rel, atol=rel * np.abs(a).max())


def _queries(op, metric=None):
    return {
        "eigs": cd.eigs(op, k=2, tol=1e-11, metric=metric).value,
        "trace": cd.trace(op, method="xtrace", matvecs=8, seed=3, metric=metric).value,
    }


@pytest.mark.parametrize("name,workers", [("mlp", 1), ("cnn", 2),
                                          pytest.param("mlp", 2, marks=pytest.mark.slow),
                                          pytest.param("cnn", 1, marks=pytest.mark.slow)])
def test_data_mode_equals_local(ray_module, name, workers):
    spec = SPECS[name]
    local = spec.build()
    backend = RayBackend()
    try:
        remote = backend.data_parallel(spec, workers)
        assert remote.num_samples == local.num_samples and remote.dim == local.dim
        for kind in ("hessian", "ggn"):
            a, b = _queries(cd.operator(local, kind)), _queries(cd.operator(remote, kind))
            for key in a:
                _close(a[key], b[key])
        G = cd.operator(local, "ggn")
        a = cd.logdet(G, damping=0.1, probes=2, steps=10, seed=1).value
        b = cd.logdet(cd.operator(remote, "ggn"), damping=0.1, probes=2, steps=10, seed=1).value
        _close(a, b)
        # an invariant query: eigenvalues of (F + δI)⁻¹H with a dense Fisher metric built from worker products
        H = cd.operator(local, "hessian")
        a = cd.eigs(H, k=2, tol=1e-11, metric=cd.metric(local, "fisher", damping=0.1)).value
        b = cd.eigs(cd.operator(remote, "hessian"), k=2, tol=1e-11,
                    metric=cd.metric(remote, "fisher", damping=0.1)).value
        _close(a, b)
        _close(cd.grad_norm(local).value, cd.grad_norm(remote).value)
        if name == "mlp":  # BackPACK diagonals and Kronecker factors computed per shard and reduced
            _close(cd.metric(local, "diag_ggn", damping=0.1).to_dense().diagonal().numpy(),
                   cd.metric(remote, "diag_ggn", damping=0.1).to_dense().diagonal().numpy())
            _close(cd.metric(local, "kflr", damping=0.1).to_dense().numpy(),
                   cd.metric(remote, "kflr", damping=0.1).to_dense().numpy())
    finally:
        backend.shutdown()


@pytest.fixture(scope="module")
def mlp_stages(ray_module) -> Iterator[StagePool]:
    """The MLP in 2 stages, shared by the tests that compute with it without changing it."""
    pool = StagePool(SPECS["mlp"], 2)
    yield pool
    pool.shutdown()


def _stages(request: pytest.FixtureRequest, name: str, stages: int) -> tuple[StagePool, bool]:
    """(pool, whether the caller shuts it down): the shared 2-stage MLP, or a new pool."""
    request.getfixturevalue("ray_module")
    if (name, stages) == ("mlp", 2):
        return request.getfixturevalue("mlp_stages"), False
    return StagePool(SPECS[name], stages), True


@pytest.mark.parametrize("name,stages", [("mlp", 2), ("cnn", 2), pytest.param("mlp", 3, marks=pytest.mark.slow),
                                         pytest.param("cnn", 3, marks=pytest.mark.slow)])  # 3 stages: 16-19 s
def test_pipeline_mode_equals_local(request, name, stages):
    spec = SPECS[name]
    local = spec.build()
    pool, own = _stages(request, name, stages)
    try:
        assert sum(i["dim"] for i in pool.infos) == local.dim
        for kind in ("hessian", "ggn"):
            op = PipelineOperator(pool, kind)
            a, b = _queries(cd.operator(local, kind)), _queries(op)
            for key in a:
                _close(a[key], b[key])
        a = cd.logdet(cd.operator(local, "ggn"), damping=0.1, probes=2, steps=8, seed=1).value
        b = cd.logdet(PipelineOperator(pool, "ggn"), damping=0.1, probes=2, steps=8, seed=1).value
        _close(a, b)
        if stages == 2:  # a CG-solved metric, vectors on the actors: M v and one CG solve M⁻¹ v equal the local ones
            M_local = cd.metric(local, "ggn", damping=0.5)
            M = PipelineMetric(PipelineOperator(pool, "ggn"), damping=0.5)
            v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            for method in ("apply", "solve"):
                want = getattr(M_local, method)(v)
                got = pool.space.to_tensor(getattr(M, method)(pool.space.from_tensor(v)))
                assert float((want - v).norm()) > 0.1 * float(v.norm())  # not the identity
                _close(want.numpy(), got.numpy(), rel=1e-9)  # CG solves to 1e-12 bound the agreement
            nan = pool.space.from_tensor(torch.full((local.dim,), float("nan"), dtype=torch.float64))
            with pytest.raises(cd.NonFiniteError, match="the pipelined ggn product is NaN or inf"):
                PipelineOperator(pool, "ggn").apply_vector(nan)  # checked with the stages' parts of ‖C v‖²
    finally:
        if own:
            pool.shutdown()


def _refused_model(factory: str, batch_size: int = 20) -> ProblemSpec:
    """A model of tests/distributed/once_model.py on 20 digits (float64)."""
    return ProblemSpec(model_factory=f"tests.distributed.once_model:{factory}", model_kwargs={"seed": 1},
                       data_factory="curvdist.zoo:digits", data_kwargs={"n": 20, "dtype": "float64"},
                       batch_size=batch_size, loss="cross_entropy", dtype="float64")


def _held_micro_batches(pool: StagePool) -> list[int]:
    return pool.ray.get([a.drop_micro_batches.remote() for a in pool.actors])


def test_pipelined_hessian_refuses_a_once_differentiable_backward(ray_module):
    """x³ with a backward marked once_differentiable at the model's output: the Hessian product would silently
    lose its second derivative (torch marks such a backward only where its incoming gradient requires grad, and the
    loss's does not: the stages give it one that does); the stages refuse it with the cause named. The GGN does not
    need it and runs afterwards, equal to local."""
    spec = _refused_model("cube_once_mlp")
    pool = StagePool(spec, 2)
    try:
        v = pool.space.random(0)
        with pytest.raises(cd.AutodiffError, match="once_differentiable"):
            PipelineOperator(pool, "hessian").apply_vector(v)
        local = spec.build()
        want = cd.operator(local, "ggn") @ pool.space.to_tensor(v)
        _close(want.numpy(), pool.space.to_tensor(PipelineOperator(pool, "ggn").apply_vector(v)).numpy())
    finally:
        pool.shutdown()


@pytest.mark.parametrize("factory,batch_size,error,match", [
    # the last stage's forward raises; its backward then finds no forward to continue: the product raises the
    # forward's error (the cause), not the backward's missing micro-batch
    ("refusing_mlp", 20, ValueError, "this layer refuses its input"),
    # an old-style autograd.Function (no setup_context, no jvp) in the last stage: the stages' forward-mode pass
    # cannot take it; the error names the stage, the micro-batch and the pass, with torch's reason
    ("old_style_mlp", 10, cd.AutodiffError, r"pipeline stage 1: the forward pass \(torch\.func\.jvp\) of micro-batch 0 "
                                            r"failed inside torch: .*setup_context"),
])
def test_a_failed_stage_pass_is_the_error_a_product_raises(ray_module, factory, batch_size, error, match):
    """Both products raise the stage's error, and afterwards no stage holds a micro-batch (stage 0's forward
    state of the failed product was dropped)."""
    pool = StagePool(_refused_model(factory, batch_size), 2)
    try:
        for kind in ("ggn", "hessian"):
            with pytest.raises(error, match=match):
                PipelineOperator(pool, kind).apply_vector(pool.space.random(0))
            assert _held_micro_batches(pool) == [0, 0]
    finally:
        pool.shutdown()


def test_stages_with_more_threads_than_cpus_equal_local(ray_module):
    """threads=2: each stage runs torch with 2 threads (its environment makes OpenMP wait passively) and its
    products are the local ones; a thread count that is not a positive integer is refused before any actor starts."""
    local = SPECS["mlp"].build()
    pool = StagePool(SPECS["mlp"], 2, threads=2)
    try:
        assert [i["threads"] for i in pool.infos] == [2, 2]
        env = pool.ray.get([a.__ray_call__.remote(lambda self: os.environ.get("OMP_WAIT_POLICY"))
                            for a in pool.actors])
        assert env == ["PASSIVE", "PASSIVE"]
        v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        for kind in ("hessian", "ggn"):
            want = cd.operator(local, kind).apply_vector(v)
            got = pool.space.to_tensor(PipelineOperator(pool, kind).apply_vector(pool.space.from_tensor(v)))
            _close(want.numpy(), got.numpy())
    finally:
        pool.shutdown()
    for bad in (0, 1.5, True):
        with pytest.raises(cd.ProblemError, match="threads must be a positive integer"):
            StagePool(SPECS["mlp"], 2, threads=bad)


@pytest.mark.slow  # 28 s on 2 cores: about 650 pipelined products (a CG solve per Lanczos step); the fast suite
# keeps the pipelined CG metric's product and solve against local through test_pipeline_mode_equals_local[mlp-2]
def test_invariant_eigenvalue_with_a_pipelined_cg_metric_equals_local(mlp_stages):
    """The top eigenvalue of M⁻¹H with the damped GGN metric solved by CG in the sharded space (Lanczos in the
    metric's inner product, every vector on the stage actors) equals the local one."""
    local = SPECS["mlp"].build()
    a = cd.eigs(cd.operator(local, "hessian"), k=1, tol=1e-10, metric=cd.metric(local, "ggn", damping=0.5)).value
    b = cd.eigs(PipelineOperator(mlp_stages, "hessian"), k=1, tol=1e-10,
                metric=PipelineMetric(PipelineOperator(mlp_stages, "ggn"), damping=0.5)).value
    _close(a, b, rel=1e-8)  # CG solves to 1e-12 bound the agreement


def test_split_points_balance_parameters():
    from curvdist.distributed.stages import split_points

    model = SPECS["mlp"].build_model()
    assert split_points(model, 1) == [(0, len(model))]
    # parameter counts per module: 325, 0, 24, 0, 50 — the largest layer gets a stage of its own
    assert split_points(model, 3) == [(0, 1), (1, 3), (3, 5)]
    assert split_points(model, 2) == [(0, 1), (1, 5)]
    with pytest.raises(cd.ProblemError, match="only 3 modules with parameters"):
        split_points(model, 4)
    with pytest.raises(cd.ProblemError, match="neither an nn.Sequential, nor a model with a stages"):
        split_points(cd.zoo.transformer(), 2)  # one block, not a ModuleList of blocks


def test_bad_input(ray_module):
    bad = ProblemSpec(model_factory="curvdist.zoo:mlp", model_kwargs={"hiden": [3]},
                      data_factory="curvdist.zoo:digits", data_kwargs={"n": 20}, loss="cross_entropy")
    with pytest.raises(Exception, match="hiden"):  # the worker's error reaches the user with its cause
        WorkerPool(bad, 2)
    with pytest.raises(cd.ProblemError, match="only 3 modules with parameters"):
        StagePool(SPECS["mlp"], 4)


def test_unreachable_address(tmp_path):
    cfg = _config(tmp_path, {"kind": "ray", "mode": "data", "workers": 1, "address": "127.0.0.1:1"})
    proc = _cli([str(cfg), "-q"], timeout=180)
    assert proc.returncode == 2
    assert "cannot start or reach Ray at 127.0.0.1:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) < 500


def _cli(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "curvdist", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def _config(tmp_path: Path, backend: dict) -> Path:
    cfg = {"seed": 0, "dtype": "float64",
           "model": {"factory": "curvdist.zoo:mlp", "kwargs": {"in_features": 64, "hidden": [6], "out_features": 10}},
           "data": {"factory": "curvdist.zoo:digits", "kwargs": {"n": 80, "dtype": "float64"}, "batch_size": 40},
           "loss": "cross_entropy",
           "queries": [{"kind": "eigs", "k": 3, "tol": 1e-12}, {"kind": "trace", "method": "hutchpp", "matvecs": 9}],
           "backend": backend}
    path = tmp_path / f"{backend['kind']}-{backend.get('mode', '')}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _values(path: Path) -> list:
    return [r["value"] for r in json.loads(path.read_text())["results"]]


@pytest.mark.slow  # two CLI runs through Ray (37 s); stage recovery is in the fast suite (test_stage_recovery.py)
def test_killed_worker_mid_lanczos_gives_the_uninterrupted_result(tmp_path):
    """CURVDIST_FAULT makes worker 1 exit at its 6th product (mid-Lanczos); Ray restarts it from its spec and
    shard, the coordinator retries the product, and the numbers equal the uninterrupted run's."""
    cfg = _config(tmp_path, {"kind": "ray", "mode": "data", "workers": 2})
    clean = _cli([str(cfg), "-o", str(tmp_path / "clean.json"), "-q"])
    assert clean.returncode == 0, clean.stderr
    faulty = _cli([str(cfg), "-o", str(tmp_path / "faulty.json"), "-q"], env={"CURVDIST_FAULT": "worker=1,call=6"})
    assert faulty.returncode == 0, faulty.stderr
    assert json.loads((tmp_path / "faulty.json").read_text())["backend"]["retried_worker_calls"] == 1
    assert json.loads((tmp_path / "clean.json").read_text())["backend"]["retried_worker_calls"] == 0
    assert _values(tmp_path / "faulty.json") == _values(tmp_path / "clean.json")


@pytest.mark.slow  # two full training runs through Ray (about a minute on 2 cores)
def test_worker_restarted_after_the_parameters_moved_computes_at_the_current_point(tmp_path):
    """curvdist train in data mode moves the workers' parameters (RiemannianSGD refreshes, logged queries); a worker
    killed late in the run is rebuilt from its spec (the initial point) and must get the current parameters again
    before the retried call: the history equals the uninterrupted run's."""
    cfg = yaml.safe_load(_config(tmp_path, {"kind": "ray", "mode": "data", "workers": 2}).read_text())
    cfg["queries"] = [{"kind": "eigs", "k": 1, "tol": 1e-10}, {"kind": "grad_norm"}]
    cfg["train"] = {"optimizer": "riemannian_sgd", "lr": 0.3, "steps": 4, "log_every": 2, "refresh": 2,
                    "metric": {"kind": "kflr", "damping": 0.1}}
    cfg["plot"] = False
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def train(out: str, env: dict | None = None) -> dict:
        proc = subprocess.run([sys.executable, "-m", "curvdist", "train", str(path), "-o", str(tmp_path / out), "-q"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
        assert proc.returncode == 0, proc.stderr
        return json.loads((tmp_path / out).read_text())

    clean = train("clean.json")
    calls = 60  # past the first parameter move (step 2): the restart lands at a point the spec does not hold
    faulty = train("faulty.json", {"CURVDIST_FAULT": f"worker=1,call={calls}"})
    assert faulty["backend"]["retried_worker_calls"] == 1 and clean["backend"]["retried_worker_calls"] == 0
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(faulty["history"]) == strip(clean["history"])


def test_stopped_and_resumed_run_gives_the_uninterrupted_result(tmp_path, capsys):
    """The stop (``os._exit(75)`` after a checkpoint) runs in a process of its own; the full run, the resumed one
    and the refused resume run in this one (an interpreter start less each)."""
    from curvdist.cli.main import main

    cfg = _config(tmp_path, {"kind": "local", "checkpoint_every": 4})
    threads = torch.get_num_threads()  # the runs choose their thread count; the tests after them keep theirs
    try:
        assert main(["run", str(cfg), "-o", str(tmp_path / "full.json"), "-q"]) == 0
        out = tmp_path / "run.json"
        stopped = _cli([str(cfg), "-o", str(out), "-q"], env={"CURVDIST_STOP_AT_STEP": "8"})
        assert stopped.returncode == 75 and not out.exists()
        assert (tmp_path / "run.json.ckpt" / "theta-0.lanczos.pt").is_file()
        assert main(["run", str(cfg), "-o", str(out), "-q", "--resume"]) == 0
        assert _values(out) == _values(tmp_path / "full.json")
        doc = json.loads(out.read_text())
        assert doc["results"][0]["info"]["resumed_from_step"] == 8
        capsys.readouterr()
        assert main(["run", str(cfg), "-o", str(tmp_path / "other.json"), "-q", "--resume"]) == 2
        assert "no checkpoint" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


TOKENS = ProblemSpec(model_factory="curvdist.zoo:transformer",
                     model_kwargs={"tokens": 64, "d_model": 4, "heads": 2, "mlp_ratio": 1, "vocab": 17,
                                   "positions": "embedding", "seed": 3, "dtype": "float64"},
                     data_factory="curvdist.zoo:digits", data_kwargs={"n": 12, "shape": "tokens"},
                     batch_size=6, loss="cross_entropy")


def test_data_mode_blocks_equal_local(ray_module):
    """Own-kernel Kronecker factors (LayerNorm, Embedding, attention) and torch.func diagonals per shard, reduced
    on the coordinator and eigendecomposed on the workers, equal the local metric."""
    local = TOKENS.build()
    backend = RayBackend()
    try:
        remote = backend.data_parallel(TOKENS, 2)
        _close(cd.metric(local, "kflr", damping=0.1).to_dense().numpy(),
               cd.metric(remote, "kflr", damping=0.1).to_dense().numpy())
        shares = remote.reducer.last_assignment
        assert all(shares) and sorted(n for s in shares for n in s) == sorted(local.param_names)
        _close(cd.metric(local, "diag_ggn", damping=0.1).to_dense().diagonal().numpy(),
               cd.metric(remote, "diag_ggn", damping=0.1).to_dense().diagonal().numpy())
    finally:
        backend.shutdown()


def test_data_mode_sampled_metrics_equal_local(ray_module):
    """Monte-Carlo labels are keyed by the global sample index: KFAC, the sampled diagonal and the sampled Fisher
    on 2 Ray workers (each its shard of the samples) equal one process on all of them."""
    spec = SPECS["mlp"]
    local = spec.build()
    backend = RayBackend()
    try:
        remote = backend.data_parallel(spec, 2)
        _close(cd.metric(local, "kfac", damping=0.1, mc_samples=2, seed=5).to_dense().numpy(),
               cd.metric(remote, "kfac", damping=0.1, mc_samples=2, seed=5).to_dense().numpy())
        _close(cd.metric(local, "diag_fisher_mc", damping=0.1, seed=3).to_dense().diagonal().numpy(),
               cd.metric(remote, "diag_fisher_mc", damping=0.1, seed=3).to_dense().diagonal().numpy())
        _close(cd.eigs(cd.operator(local, "fisher_mc", mc_samples=2, seed=1), k=2, tol=1e-11).value,
               cd.eigs(cd.operator(remote, "fisher_mc", mc_samples=2, seed=1), k=2, tol=1e-11).value)
    finally:
        backend.shutdown()


@pytest.mark.parametrize("kind", ["kflr", pytest.param("fisher", marks=pytest.mark.slow)])
def test_riemannian_sgd_through_ray_equals_local(ray_module, kind):
    """The optimizer with its metric on 2 Ray workers (parameters broadcast at every refresh) takes the same steps
    as with the metric computed locally."""
    from curvdist.optim import RiemannianSGD

    spec = SPECS["mlp"]
    X, y = spec.build_data()
    models = [spec.build_model().double(), spec.build_model().double()]
    backend = RayBackend()
    try:
        remote = backend.data_parallel(spec, 2)
        opts = [RiemannianSGD(models[0], "cross_entropy", (X, y), metric=kind, lr=0.3, damping=0.1, refresh=2),
                RiemannianSGD(models[1], metric=kind, lr=0.3, damping=0.1, refresh=2, problem=remote)]
        for _ in range(4):
            for model, opt in zip(models, opts):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X), y).backward()
                opt.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            _close(a.detach().numpy(), b.detach().numpy())
        assert not torch.equal(next(models[0].parameters()), next(spec.build_model().double().parameters()))
    finally:
        backend.shutdown()


@pytest.mark.parametrize("name,stages,exact", [("mlp", 2, False),
                                               pytest.param("cnn", 3, True, marks=pytest.mark.slow)])
def test_pipeline_kfac_blocks_equal_local(request, name, stages, exact):
    """Every stage computes its own layers' Kronecker factors from the activations and output gradients passing
    through it, and applies its blocks to its shard: equal to the local own-kernel metric, and usable by queries."""
    from curvdist.distributed.pipeline import PipelineBlockMetric
    from curvdist.geometry.metrics.kfac import kfac

    spec = SPECS[name]
    local = spec.build()
    M_local = kfac(local, damping=0.1, exact=exact, mc_samples=2, seed=5, backend="torch")
    pool, own = _stages(request, name, stages)
    try:
        M = PipelineBlockMetric(pool, "kflr" if exact else "kfac", damping=0.1, mc_samples=2, seed=5)
        v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        space = pool.space
        for method in ("apply", "solve", "inv_sqrt_apply"):
            _close(getattr(M_local, method)(v).numpy(), space.to_tensor(getattr(M, method)(space.from_tensor(v))).numpy())
        _close(M_local.logdet(), M.logdet())
        a = cd.eigs(cd.operator(local, "ggn"), k=2, tol=1e-11, metric=M_local).value
        b = cd.eigs(PipelineOperator(pool, "ggn"), k=2, tol=1e-11, metric=M).value
        _close(a, b)
    finally:
        if own:
            pool.shutdown()


def _cli_config(mode: str, queries: list[dict]) -> dict:
    spec = SPECS["mlp"]
    backend = {"kind": "ray", "mode": mode, "workers": 2, "stages": 2}
    if mode == "pipeline":  # the YAML's stage threads reach the stages (the API below asks for the same)
        backend["stage_threads"] = 2
    return {"seed": 0, "dtype": "float64", "loss": "cross_entropy", "plot": False,
            "model": {"factory": spec.model_factory, "kwargs": dict(spec.model_kwargs)},
            "data": {"factory": spec.data_factory, "kwargs": dict(spec.data_kwargs), "batch_size": spec.batch_size},
            "queries": queries, "backend": backend}


@pytest.mark.slow  # 54 s; data and pipeline mode against local are fast tests of their own
def test_python_backend_api_equals_cli(ray_module, tmp_path):
    """The same queries through cd.ray_backend (data and pipeline mode) and through the CLI's YAML backend give
    identical numbers; what pipeline mode cannot do is refused when asked."""
    from curvdist.cli.config import validate_config
    from curvdist.cli.runner import run

    spec = cd.ProblemSpec("curvdist.zoo:mlp", "curvdist.zoo:digits", loss="cross_entropy",
                          model_kwargs=dict(SPECS["mlp"].model_kwargs), data_kwargs=dict(SPECS["mlp"].data_kwargs),
                          batch_size=30, dtype="float64")
    data_queries = [{"kind": "eigs", "k": 2, "tol": 1e-10}, {"kind": "trace", "method": "xtrace", "matvecs": 8},
                    {"kind": "eigs", "k": 1, "metric": {"kind": "kflr", "damping": 0.1}}, {"kind": "grad_norm"}]
    cli = run(validate_config(_cli_config("data", data_queries)), output=str(tmp_path / "d.json"), progress=False)
    pipe_queries = [{"kind": "eigs", "k": 2, "tol": 1e-10},
                    {"kind": "eigs", "k": 1, "metric": {"kind": "ggn", "damping": 0.5}, "tol": 1e-10}]
    cli_pipe = run(validate_config(_cli_config("pipeline", pipe_queries)), output=str(tmp_path / "p.json"),
                   progress=False)
    with cd.ray_backend(workers=2) as backend:
        problem = backend.data_parallel(spec)
        assert isinstance(problem, cd.ShardedProblem) and problem.backend == "ray-data[2]"
        H = cd.operator(problem, "hessian")
        api = [cd.eigs(H, k=2, tol=1e-10, seed=0), cd.trace(H, method="xtrace", matvecs=8, seed=0),
               cd.eigs(H, k=1, tol=1e-8, metric=cd.metric(problem, "kflr", damping=0.1), seed=0),
               cd.grad_norm(problem)]
        # per-layer spectra of a data-parallel problem equal the local ones
        local = spec.build()
        a = cd.block_spectra(local, "ggn", "kflr", damping=0.1, compare=False).value["blocks"]
        b = cd.block_spectra(problem, "ggn", "kflr", damping=0.1, compare=False).value["blocks"]
        for name in a:
            _close(a[name]["eigenvalues"], b[name]["eigenvalues"])

        staged = backend.pipeline(spec, stages=2, threads=2)
        assert staged.backend == "ray-pipeline[2]" and [i["threads"] for i in staged.pool.infos] == [2, 2]
        Hp = cd.operator(staged, "hessian")
        api_pipe = [cd.eigs(Hp, k=2, tol=1e-10, seed=0),
                    cd.eigs(Hp, k=1, tol=1e-10, metric=cd.metric(staged, "ggn", damping=0.5), seed=0)]
        with pytest.raises(cd.ProblemError, match="pipeline mode supports the curvature kinds hessian, ggn, fisher"):
            cd.operator(staged, "fisher_mc")
        with pytest.raises(cd.MetricError, match="pipeline mode has no 'fisher_mc' metric"):
            cd.metric(staged, "fisher_mc", damping=0.1)
        with pytest.raises(cd.MetricError, match="solved by CG"):
            cd.metric(staged, "ggn", damping=0.1, method="dense")
        with pytest.raises(cd.MetricError, match=r"takes the options \['method', 'cg_tol', 'cg_maxiter'\], not \['damping_metric'\]"):
            cd.metric(staged, "ggn", damping=0.1, damping_metric=None)
        with pytest.raises(cd.ProblemError, match="the gradient lives on the stages.*grad_norm is not available"):
            cd.grad_norm(Hp)
        with pytest.raises(cd.ProblemError, match="parameters this process holds"):
            cd.block_spectra(staged)
        with pytest.raises(cd.ProblemError, match="pipeline"):
            cd.optim.RiemannianSGD(spec.build_model(), problem=staged)
    for r, doc in zip(api, cli["results"]):
        assert r.value == doc["value"] and r.backend == doc["backend"] == "ray-data[2]"
    for r, doc in zip(api_pipe, cli_pipe["results"]):
        assert r.value == doc["value"] and r.backend == doc["backend"] == "ray-pipeline[2]"
        assert doc["info"]["product"]["threads"] == [2, 2]  # the query's schedule, from the stages
