"""The tiny language-model config end to end through the CLI (shrunk with --set to keep the suite fast), checked
against an independent solver on the same problem built through the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.sparse.linalg import eigsh

import curvdist as cd
from curvdist.cli.main import main
from curvdist.zoo import hf_causal_lm, markov_corpus

CONFIG = Path(__file__).parents[2] / "configs" / "lm" / "tiny_gpt2.yaml"
SHRINK = ["model.kwargs.config.n_embd=8", "model.kwargs.config.n_layer=1", "data.kwargs.n=8", "train=null"]


def test_tiny_lm_config_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = ["run", str(CONFIG), "-q", "-o", str(out)]
    for s in SHRINK:
        args += ["--set", s]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    kinds = [r["query"] for r in doc["results"]]
    assert kinds == ["eigs", "flatness", "block_spectra"] * 2  # θ and ψ
    # the NTK table: flatness in the KFAC metric is invariant, the Euclidean eigenvalues are not
    rows = {r["quantity"]: r for r in doc["invariance"]}
    for q in ("flatness.top_eigenvalue", "flatness.trace", "flatness.logdet"):
        assert rows[q]["relative_change"] < 1e-9, rows[q]
    assert rows["eig[0] (largest)"]["relative_change"] > 1e-3
    blocks = [q for q in rows if q.startswith("block ")]
    assert blocks == ["block transformer.wte top eigenvalue", "block transformer.wpe top eigenvalue",
                      "block transformer.h.0 top eigenvalue", "block transformer.ln_f top eigenvalue"]

    # the top Hessian eigenvalues against scipy's ARPACK on the same (untrained, seeded) problem
    cfg = yaml.safe_load(CONFIG.read_text())
    mcfg = dict(cfg["model"]["kwargs"]["config"], n_embd=8, n_layer=1)
    model = hf_causal_lm(mcfg, seed=0, dtype="float64")
    data = markov_corpus(**dict(cfg["data"]["kwargs"], n=8))
    problem = cd.Problem(model, "causal_lm", data, batch_size=cfg["data"]["batch_size"])
    assert problem.dim == doc["problem"]["dim"]
    top = np.sort(eigsh(cd.operator(problem, "hessian").to_scipy(), k=3, which="LA", tol=1e-10)[0])[::-1]
    theta_eigs = next(r for r in doc["results"] if r["query"] == "eigs" and r["coordinates"] == "theta")
    np.testing.assert_allclose(theta_eigs["value"], top, rtol=1e-6)


def test_lm_config_validates_micro_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"]["micro_batch_size"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "-q", "-o", str(tmp_path / "x.json")]) == 2
    assert "invalid value for 'data.micro_batch_size'" in capsys.readouterr().err
