"""Training in pipeline mode equals training in one process: the gradient through the stages (a tied embedding
and head included), the stage-local elementwise optimizers, and riemannian_sgd with a stage-local KFAC metric —
the same losses and parameters after every step (float64); `curvdist train` with a pipeline backend gives the
local run's history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.cli.build import train_step
from curvdist.distributed.pipeline import PipelineProblem, StagePool
from curvdist.distributed.pipeline_train import PipelineTrainer
from curvdist.problem.spec import ProblemSpec

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the dev install")

VOCAB = 12
#: no dropout: the stages run the traced model in eval mode
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 8, "n_embd": 8, "n_layer": 3, "n_head": 2,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
MODEL = {"factory": "curvdist.zoo:hf_causal_lm", "kwargs": {"config": GPT2, "seed": 1}}
DATA = {"factory": "curvdist.zoo:markov_corpus",
        "kwargs": {"n": 6, "vocab_size": VOCAB, "max_length": 6, "min_length": 3, "seed": 2}, "batch_size": 3}


def spec(config=GPT2) -> ProblemSpec:
    return ProblemSpec(MODEL["factory"], DATA["factory"], "causal_lm", model_kwargs={"config": config, "seed": 1},
                       data_kwargs=dict(DATA["kwargs"]), batch_size=3, dtype="float64")


@pytest.mark.parametrize("optimizer", ["adamw", "riemannian_sgd"])
def test_pipeline_training_equals_local(ray_module, optimizer):
    s = spec()
    local = s.build()
    model = local.model
    if optimizer == "adamw":
        named = dict(model.named_parameters())
        opt = torch.optim.AdamW([named[n] for n in local.param_names], lr=0.05, weight_decay=0.01)
        options = {"weight_decay": 0.01}
    else:
        opt = cd.optim.RiemannianSGD(model, "causal_lm", local.data, metric="kfac", lr=0.5, damping=0.1,
                                     refresh=2, momentum=0.5, metric_options={"mc_samples": 2, "seed": 3})
        options = {"momentum": 0.5, "metric": "kfac", "damping": 0.1, "refresh": 2,
                   "metric_options": {"mc_samples": 2, "seed": 3}}
    pool = StagePool(s, 2, micro_batches=2)
    try:
        problem = PipelineProblem(pool)
        trainer = PipelineTrainer(problem, optimizer, lr=0.05 if optimizer == "adamw" else 0.5, **options)
        assert pool.ties and trainer.num_batches == 2
        np.testing.assert_allclose(problem.value(), local.value(), rtol=1e-12)
        batches = list(local.batches())
        for step in range(4):
            X, y = batches[step % 2]
            want = train_step(model, local, opt, X, y)
            got = trainer.step(step % 2)
            np.testing.assert_allclose(got, want, rtol=1e-10)
        theta = torch.cat([p.detach().reshape(-1) for p in local.params])
        start = torch.cat([p.detach().reshape(-1) for p in s.build().params])
        assert float((theta - start).norm()) > 1e-2  # the steps moved the parameters
        torch.testing.assert_close(pool.params_flat(), theta, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(problem.value(), local.value(), rtol=1e-10)
        # products after training are at the trained point (the tied copy on the last stage followed its owner)
        v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        op = cd.operator(problem, "ggn")
        want = cd.operator(local, "ggn") @ v
        got = pool.space.to_tensor(op.apply_vector(pool.space.from_tensor(v)))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
        if optimizer == "adamw":  # the squared gradient norm the step checks comes from the stages' finish calls
            _, g, g_norm2 = trainer._loss_gradient_norm2(0)
            X, y = batches[0]
            grads = torch.func.grad(lambda ps: local.batch_loss(list(ps), X, y))(tuple(local.params))
            local_grad = torch.cat([t.reshape(-1) for t in grads]) / local.loss.count(y)
            np.testing.assert_allclose(g_norm2, float(local_grad @ local_grad), rtol=1e-9)
            np.testing.assert_allclose(g_norm2, pool.space.dot(g, g), rtol=1e-12)
    finally:
        pool.shutdown()


def test_pipeline_training_refuses_dropout(ray_module):
    from curvdist.cli.config import validate_config
    from curvdist.cli.train import train_and_log

    config = {k: v for k, v in GPT2.items() if not k.endswith("pdrop")}  # GPT-2's default dropout 0.1
    cfg = validate_config({"seed": 0, "dtype": "float64", "loss": "causal_lm", "plot": False,
                           "model": {**MODEL, "kwargs": {"config": config, "seed": 1}}, "data": DATA,
                           "queries": [{"kind": "trace", "method": "hutchpp", "matvecs": 3}],
                           "train": {"optimizer": "adam", "lr": 0.01, "steps": 1, "log_every": 1},
                           "backend": {"kind": "ray", "mode": "pipeline", "stages": 2}})
    with pytest.raises(cd.ConfigError, match="eval mode.*Dropout"):
        train_and_log(cfg, progress=False)


@pytest.mark.slow  # two training runs with logged queries (about 30 s on 2 cores)
def test_curvdist_train_pipeline_gives_the_local_history(ray_module, tmp_path):
    from curvdist.cli.config import validate_config
    from curvdist.cli.train import train_and_log

    def run(backend):
        cfg = validate_config({"seed": 0, "dtype": "float64", "loss": "causal_lm", "plot": False,
                               "model": MODEL, "data": DATA,
                               "queries": [{"kind": "eigs", "k": 1, "tol": 1e-10,
                                            "metric": {"kind": "diag_ggn", "damping": 0.1}}],
                               "train": {"optimizer": "riemannian_sgd", "lr": 0.3, "steps": 3, "log_every": 2,
                                         "refresh": 2, "metric": {"kind": "kflr", "damping": 0.1}},
                               "backend": backend})
        return train_and_log(cfg, output=str(tmp_path / f"{backend['kind']}.json"), progress=False)

    local = run({"kind": "local"})
    piped = run({"kind": "ray", "mode": "pipeline", "stages": 2, "micro_batches": 2})
    assert [h["step"] for h in piped["history"]] == [0, 2, 3]
    for a, b in zip(local["history"], piped["history"]):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-10)
        np.testing.assert_allclose(b["eigs/eig0"], a["eigs/eig0"], rtol=1e-8)
    assert piped["backend"]["train_updates"] == 3
