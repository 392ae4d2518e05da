"""The `curvdist run` command end to end, config validation, overrides and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from curvdist import zoo
from curvdist.cli.main import main
from tests import dense

MODEL_KWARGS = {"in_features": 64, "hidden": [6], "out_features": 10, "activation": "tanh", "seed": 3}
DATA_KWARGS = {"split": "train", "n": 120, "dtype": "float64"}


def _config(tmp_path: Path, **extra) -> dict:
    cfg = {
        "seed": 0,
        "dtype": "float64",
        "model": {"factory": "curvdist.zoo:mlp", "kwargs": MODEL_KWARGS},
        "data": {"factory": "curvdist.zoo:digits", "kwargs": DATA_KWARGS, "batch_size": 50},
        "loss": "cross_entropy",
        "curvature": "hessian",
        "queries": [
            {"kind": "grad_norm"},
            {"kind": "eigs", "k": 3, "tol": 1e-10},
            {"kind": "trace", "method": "exact"},
            {"kind": "trace", "method": "xtrace", "matvecs": 40},
            {"kind": "logdet", "curvature": "ggn", "damping": 0.1, "probes": 4, "steps": 20},
            {"kind": "density", "probes": 2, "steps": 20, "grid": 200},
        ],
        "output": str(tmp_path / "out.json"),
    }
    cfg.update(extra)
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def checkpointed(tmp_path):
    """A model with perturbed weights saved as a state_dict, and the same model for ground truth."""
    model = zoo.mlp(**MODEL_KWARGS, dtype="float64")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_run_end_to_end(tmp_path, checkpointed, capsys):
    model, ckpt = checkpointed
    cfg = _config(tmp_path)
    cfg["model"]["checkpoint"] = str(ckpt)
    assert main(["run", str(_write(tmp_path, cfg))]) == 0
    printed = capsys.readouterr().out
    assert "eigs" in printed and "xtrace" not in printed and "wrote" in printed

    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["config"]["model"]["checkpoint"] == str(ckpt)
    assert {"curvdist", "torch", "python"} <= set(doc["versions"])
    res = doc["results"]
    assert [r["query"] for r in res] == ["grad_norm", "eigs", "trace", "trace", "logdet", "density"]
    for r in res:
        for key in ("query", "curvature", "metric", "coordinates", "value", "stderr", "matvecs", "seconds",
                    "converged"):
            assert key in r

    X, y = zoo.digits(**DATA_KWARGS)
    H = dense.dense_hessian(model, "cross_entropy", X, y, "mean")
    G = dense.dense_ggn(model, "cross_entropy", X, y, "mean")
    s = torch.linalg.eigvalsh(H)
    np.testing.assert_allclose(res[1]["value"], s.flip(0)[:3].numpy(), rtol=1e-8)
    assert res[2]["value"] == pytest.approx(float(torch.trace(H)), rel=1e-9)
    assert abs(res[3]["value"] - float(torch.trace(H))) <= 4 * res[3]["stderr"]
    logdet = float(torch.logdet(G + 0.1 * torch.eye(len(G), dtype=G.dtype)))
    assert res[4]["curvature"] == "ggn" and abs(res[4]["value"] - logdet) <= 4 * res[4]["stderr"]
    g = dense.per_sample_grads(model, "cross_entropy", X, y).mean(0)
    assert res[0]["value"] == pytest.approx(float(g @ g), rel=1e-9)
    png = tmp_path / "out_density.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert doc["plots"] == [str(png)]


def test_train_reaches_lower_loss_and_overrides(tmp_path):
    cfg = _config(tmp_path, queries=[{"kind": "grad_norm"}])
    path = _write(tmp_path, cfg)
    assert main(["run", str(path), "--set", "train={optimizer: adam, lr: 0.05, steps: 30}",
                 "--set", "queries.0.kind=eigs", "--output", str(tmp_path / "o2.json"), "-q"]) == 0
    doc = json.loads((tmp_path / "o2.json").read_text())
    model = zoo.mlp(**MODEL_KWARGS, dtype="float64")
    X, y = zoo.digits(**DATA_KWARGS)
    with torch.no_grad():
        initial = float(torch.nn.functional.cross_entropy(model(X), y))
    assert doc["train"]["steps"] == 30
    assert doc["train"]["final_loss"] < 0.5 * initial
    assert doc["results"][0]["query"] == "eigs"  # the override took effect


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(qeries=c.pop("queries")), "unknown key 'qeries'"),
    (lambda c: c["queries"][1].update(k="three"), "invalid value for 'queries.1.k'"),
    (lambda c: c.pop("loss"), "missing required key 'loss'"),
    (lambda c: c["queries"].append({"kind": "trace", "matvec": 5}), "unknown key 'queries.6.matvec'"),
    (lambda c: c.update(curvature="hesian"), "invalid value for 'curvature.kind'"),
    (lambda c: c["model"].update(factory="curvdist.zoo:nope"), "model.factory: module 'curvdist.zoo' has no "
                                                                "attribute 'nope'"),
    (lambda c: c["data"].update(factory="no_such_module:f"), "data.factory: cannot import module"),
    (lambda c: c["model"].update(kwargs={"hiden": [3]}), "model.factory 'curvdist.zoo:mlp' failed with TypeError"),
    (lambda c: c["model"].update(checkpoint="/nonexistent/w.pt"), "model.checkpoint: file not found"),
    (lambda c: c.update(backend={"kind": "ray", "mode": "pipeline", "balance": "flops"}),
     "invalid value for 'backend.balance': Value error, must be one of parameters, compute, time or a list of the "
     "blocks (modules) of each stage, non-negative integers (got 'flops')"),
    (lambda c: c.update(backend={"kind": "ray", "mode": "pipeline", "balance": [3, -1]}),
     "non-negative integers; got [3, -1]"),
])
def test_config_errors_are_one_line(tmp_path, capsys, edit, message):
    cfg = _config(tmp_path)
    edit(cfg)
    assert main(["run", str(_write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_k_larger_than_dimension_is_a_clear_cli_error(tmp_path, capsys):
    cfg = _config(tmp_path, queries=[{"kind": "eigs", "k": 10_000}])
    assert main(["run", str(_write(tmp_path, cfg))]) == 2
    assert "k=10000 eigenvalues requested but the operator has dimension" in capsys.readouterr().err


def test_console_entry_point(tmp_path):
    cfg = _config(tmp_path, queries=[{"kind": "eigs", "k": 1}])
    proc = subprocess.run([sys.executable, "-m", "curvdist", "run", str(_write(tmp_path, cfg))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "eigs" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "curvdist", "run", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config file not found" in bad.stderr


QUICK_REPARAM_CONFIGS = ["ntk", "exp", "linear"]


@pytest.mark.parametrize("name", QUICK_REPARAM_CONFIGS)
def test_reparam_configs_show_invariance(tmp_path, name):
    """Every invariant row (Fisher-metric GGN, pulled-back metric with the Riemannian Hessian, and for constant-J
    kinds Fisher-metric Hessian) agrees to 1e-8 between θ and ψ; the Euclidean rows change."""
    out = tmp_path / f"{name}.json"
    assert main(["run", f"configs/reparam/{name}.yaml", "-o", str(out), "-q"]) == 0
    doc = json.loads(out.read_text())
    rows = doc["invariance"]
    assert {r["coordinates"] for r in doc["results"]} == {"theta", "psi"}
    constant_j = name in ("ntk", "linear", "scale")
    for r in rows:
        invariant = r["metric"].startswith("pullback") or (r["metric"].startswith("fisher") and
                                                          (r["curvature"] == "ggn" or constant_j))
        if invariant:
            assert r["relative_change"] <= 1e-8, r
        elif r["metric"] == "euclidean" and r["quantity"].startswith("eig[0]"):
            assert r["relative_change"] >= 1e-3, r


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scale", "softplus", "compose", "weight_norm"])
def test_other_reparam_configs(tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert main(["run", f"configs/reparam/{name}.yaml", "-o", str(out), "-q"]) == 0
    rows = json.loads(out.read_text())["invariance"]
    assert any(r["relative_change"] <= 1e-8 for r in rows)


def test_quickstart_invariance_table(tmp_path):
    """The README's claim: invariant rows ≤ 1e-8 relative change, Euclidean rows ≥ 10×."""
    out = tmp_path / "qs.json"
    assert main(["run", "configs/quickstart.yaml", "-o", str(out), "-q"]) == 0
    doc = json.loads(out.read_text())
    for r in doc["invariance"]:
        if r["metric"] == "euclidean":
            assert r["relative_change"] >= 10, r
        else:
            assert r["relative_change"] <= 1e-8, r
    assert (tmp_path / "qs_density.png").is_file()


def test_all_configs_validate():
    from pathlib import Path

    from curvdist.cli.config import load_config

    paths = sorted(Path("configs").rglob("*.yaml"))
    assert len(paths) >= 8
    for p in paths:
        load_config(p)


# ---------------------------------------------------------------------------------------------- curvdist train
TRAIN = {"optimizer": "riemannian_sgd", "lr": 0.2, "steps": 4, "refresh": 2, "log_every": 2,
         "metric": {"kind": "kflr", "damping": 0.05}}
LOGGED = [{"kind": "eigs", "k": 1, "tol": 1e-11, "metric": {"kind": "fisher", "damping": 0.1}},
          {"kind": "grad_norm", "metric": {"kind": "fisher", "damping": 0.1}}]


def _train_by_hand() -> list[torch.nn.Module]:
    """The same training outside the CLI: RiemannianSGD with KFLR on the same mini-batches; snapshots at 0, 2, 4."""
    from curvdist.optim import RiemannianSGD

    model = zoo.mlp(**MODEL_KWARGS, dtype="float64")
    X, y = zoo.digits(**DATA_KWARGS)
    batches = [(X[i:i + 50], y[i:i + 50]) for i in range(0, len(y), 50)]
    opt = RiemannianSGD(model, "cross_entropy", batches, metric="kflr", lr=0.2, damping=0.05, refresh=2)
    import copy

    snaps = [copy.deepcopy(model)]
    for step in range(4):
        Xb, yb = batches[step % len(batches)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(Xb), yb).backward()
        opt.step()
        if step % 2 == 1:
            snaps.append(copy.deepcopy(model))
    return snaps


def test_train_logs_invariant_flatness(tmp_path, capsys):
    cfg = _config(tmp_path, train=TRAIN, queries=LOGGED)
    path = _write(tmp_path, cfg)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr()
    assert "step     4: loss" in out.out + out.err
    doc = json.loads((tmp_path / "out.json").read_text())
    history = doc["history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    assert Path(doc["plots"][0]).is_file()
    X, y = zoo.digits(**DATA_KWARGS)
    for h, model in zip(history, _train_by_hand()):
        H = dense.dense_hessian(model, "cross_entropy", X, y, "mean").numpy()
        F = dense.dense_ggn(model, "cross_entropy", X, y, "mean").numpy() + 0.1 * np.eye(len(H))
        top = np.linalg.eigvalsh(np.linalg.solve(np.linalg.cholesky(F), np.linalg.solve(
            np.linalg.cholesky(F), H).T)).max()
        np.testing.assert_allclose(h["eigs/eig0"], top, rtol=1e-8)
        with torch.no_grad():
            np.testing.assert_allclose(h["loss"], float(torch.nn.functional.cross_entropy(model(X), y)), rtol=1e-12)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("train"), "needs a 'train' section"),
    (lambda c: c["train"].update(optimizer="adam"), "train.metric is used by riemannian_sgd only"),
    (lambda c: c.update(reparam={"kind": "ntk"}), "remove 'reparam'"),
])
def test_train_config_errors(tmp_path, capsys, edit, message):
    cfg = _config(tmp_path, train=dict(TRAIN), queries=LOGGED)
    edit(cfg)
    assert main(["train", str(_write(tmp_path, cfg)), "-q"]) != 0
    assert message in capsys.readouterr().err


def test_evidence_query_in_a_config_is_invariant(tmp_path):
    """`{kind: evidence, prior_precision, metric: {kind: kflr}}` in θ and in the NTK coordinates ψ: the same
    log-evidence (the mode search takes the same metric-whitened path in both; capped here to keep the test short)."""
    cfg = _config(tmp_path, data={"factory": "curvdist.zoo:digits", "kwargs": {**DATA_KWARGS, "n": 40},
                                  "batch_size": 40},
                  queries=[{"kind": "evidence", "prior_precision": 2.0, "metric": {"kind": "kflr"}, "logdet": "exact",
                            "max_iter": 30}],
                  reparam={"kind": "ntk", "kwargs": {"sigma_w": 1.5}})
    assert main(["run", str(_write(tmp_path, cfg)), "-q"]) == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    (row,) = doc["invariance"]
    assert row["quantity"] == "evidence" and row["metric"].startswith("kflr")
    assert row["relative_change"] <= 1e-8, row
    theta = next(r for r in doc["results"] if r["coordinates"] == "theta")
    assert theta["info"]["logdet_method"] == "exact" and theta["info"]["mode_iterations"] <= 30
    assert theta["info"]["approximation"].startswith("A = GGN")
