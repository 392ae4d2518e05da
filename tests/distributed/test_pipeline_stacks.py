"""Pipeline mode on Hugging Face decoders (GPT-2 with its head tied to the token embedding, LLaMA with
tie_word_embeddings): the model is traced and cut at its blocks, micro-batches flow GPipe-style, and Hessian and
GGN eigenvalues, traces and log-dets equal the local backend's in float64 (same seeds) to 1e-10.

The local Hessian runs reverse-over-reverse like the stages: LLaMA's RMSNorm computes in float32 whatever the
model's dtype, so two AD modes of it differ at float32 rounding (see tests/language/conftest.py). One mode through
one split or another gives the same products to float64 rounding. LLaMA's Hessian is then not symmetric at float32
rounding (⟨b, Ha⟩ − ⟨a, Hb⟩ ≈ 4·10⁻⁷ relative), and Lanczos values of such an operator move at 10⁻⁸ when its
products move at 10⁻¹¹, so LLaMA's Hessian eigenvalues and traces are compared to :data:`LLAMA_HESSIAN_QUERIES`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.distributed.pipeline import PipelineOperator, PipelineProblem, StagePool
from curvdist.distributed.stacks import balanced_cuts, block_units, counts_from_cuts, find_blocks, split_points
from curvdist.problem.spec import ProblemSpec

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the dev install")

REL = 1e-10
#: LLaMA's Hessian queries, pipelined against local (module docstring): measured 1.4·10⁻⁸ (eigenvalues)
LLAMA_HESSIAN_QUERIES = 1e-6
VOCAB = 12
CONFIGS = {
    "gpt2": {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 8, "n_embd": 8, "n_layer": 3, "n_head": 2},
    "llama": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8, "intermediate_size": 12,
              "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 8, "tie_word_embeddings": True},
}


def spec(name: str) -> ProblemSpec:
    """5 padded sequences (−100 labels after each end) in batches of 3 and 2."""
    return ProblemSpec("curvdist.zoo:hf_causal_lm", "curvdist.zoo:markov_corpus", "causal_lm",
                       model_kwargs={"config": CONFIGS[name], "seed": 1},
                       data_kwargs={"n": 5, "vocab_size": VOCAB, "max_length": 6, "min_length": 3, "seed": 2},
                       batch_size=3, dtype="float64")


def _close(a, b, rel=REL):
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    np.testing.assert_allclose(b, a, rtol=rel, atol=rel * np.abs(a).max())


def _local_operator(problem, kind):
    return cd.operator(problem, kind, **({"mode": "reverse_over_reverse"} if kind == "hessian" else {}))


@pytest.mark.parametrize("name,stages,micro", [
    # slow (34 s): the fast suite keeps traced GPT-2 stages through test_stage_metrics_of_traced_decoders_equal_local
    pytest.param("gpt2", 3, 3, marks=pytest.mark.slow),
    pytest.param("gpt2", 2, 1, marks=pytest.mark.slow), pytest.param("gpt2", 2, 3, marks=pytest.mark.slow),
    pytest.param("gpt2", 3, 1, marks=pytest.mark.slow), pytest.param("llama", 2, 1, marks=pytest.mark.slow),
    pytest.param("llama", 2, 3, marks=pytest.mark.slow), pytest.param("llama", 3, 1, marks=pytest.mark.slow),
    pytest.param("llama", 3, 3, marks=pytest.mark.slow)])
def test_pipelined_decoder_equals_local(ray_module, name, stages, micro):
    s = spec(name)
    local = s.build()
    pool = StagePool(s, stages, micro_batches=micro)
    try:
        assert pool.space.dim == local.dim
        # the tied head: the last stage uses the embedding owned by stage 0 and holds a copy of it
        tied = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
        assert pool.ties == [(tied, 0, stages - 1)]
        assert pool.infos[-1]["held"] > pool.infos[-1]["dim"]
        # micro-batches: batches of 3 and 2 sequences, each cut into min(micro, size) parts
        assert pool.num_batches == (2 if micro == 1 else 5)
        v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for kind in ("hessian", "ggn"):
            op = PipelineOperator(pool, kind)
            ref = _local_operator(local, kind)
            got = pool.space.to_tensor(op.apply_vector(pool.space.from_tensor(v)))
            torch.testing.assert_close(got, ref @ v, rtol=REL, atol=REL * float((ref @ v).abs().max()))
            rel = LLAMA_HESSIAN_QUERIES if (name, kind) == ("llama", "hessian") else REL
            _close(cd.eigs(ref, k=2, tol=1e-11).value, cd.eigs(op, k=2, tol=1e-11).value, rel)
            _close(cd.trace(ref, method="hutchpp", matvecs=9, seed=3).value,
                   cd.trace(op, method="hutchpp", matvecs=9, seed=3).value, rel)
        _close(cd.logdet(cd.operator(local, "ggn"), damping=0.1, probes=2, steps=8, seed=1).value,
               cd.logdet(PipelineOperator(pool, "ggn"), damping=0.1, probes=2, steps=8, seed=1).value)
    finally:
        pool.shutdown()


@pytest.fixture(scope="module")
def gpt2_stages(ray_module) -> Iterator[StagePool]:
    """GPT-2 in 2 skeleton stages of 2 micro-batches each batch, shared by the tests that only compute with it (a
    pool of traced stages takes about 10 s to build on 2 cores)."""
    pool = StagePool(spec("gpt2"), 2, micro_batches=2)
    yield pool
    pool.shutdown()


def test_schedule_memory_and_refusals(gpt2_stages):
    """One query through the pipeline records its schedule (stage utilization) and each process's memory."""
    from curvdist.queries.session import Coordinates, run_query
    from curvdist.queries.specs import CurvatureSpec, EigsQuery, MetricSpec

    staged = PipelineProblem(gpt2_stages)
    r = run_query(EigsQuery(kind="eigs", k=1, tol=1e-8), Coordinates("theta", staged, 0),
                  CurvatureSpec(kind="ggn"), MetricSpec(), 0)
    product = r.info["product"]
    assert product["mode"] == "pipeline" and product["stages"] == 2 and product["micro_batches"] == 4
    assert product["products"] == r.matvecs > 0  # the meters count this query's products
    assert all(0 < u <= 1 for u in product["utilization"])
    assert product["threads"] == [1, 1]  # one per CPU Ray gives a stage (the default)
    memory = r.info["memory"]
    assert [m["role"] for m in memory] == ["coordinator", "stage 0", "stage 1"]
    infos = gpt2_stages.infos
    assert [m["parameters"] for m in memory] == [0, infos[0]["held"], infos[1]["held"]]
    assert all(m["peak_rss_mb"] >= m["rss_mb"] * 0.5 > 0 for m in memory)
    assert all(m["window"] == "query" for m in memory)


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_skeleton_stages_equal_stages_built_from_the_whole_model(request, name):
    """Stages built as meta skeletons that fetch only their own parameters (here from files: one node) compute the same
    products, bit for bit, as stages that built the whole model; a stage's held parameters are its own (and the
    tied weight)."""
    request.getfixturevalue("ray_module")
    whole = StagePool(spec(name), 2, micro_batches=2, skeletons=False)
    own = [whole] if name == "gpt2" else [whole, StagePool(spec(name), 2, micro_batches=2)]  # gpt2: the fixture's
    pools = {True: request.getfixturevalue("gpt2_stages") if name == "gpt2" else own[1], False: whole}
    try:
        out = {}
        for k, pool in pools.items():
            assert [i["built"] for i in pool.infos] == (["skeleton"] * 2 if k else ["whole"] * 2)
            v = pool.space.random(3, "gaussian")
            out[k] = [pool.space.to_tensor(PipelineOperator(pool, kind).apply_vector(v)) for kind in ("ggn", "hessian")]
        for a, b in zip(out[True], out[False]):
            assert torch.equal(a, b)
        infos = pools[True].infos
        assert [i["held"] for i in infos] == [i["held"] for i in pools[False].infos]
        assert all(i["held"] < i["total"] for i in infos)
    finally:
        for pool in own:
            pool.shutdown()


@pytest.mark.parametrize("via", ["files", "object_store"])
def test_published_weights_fill_a_skeleton_bit_for_bit(ray_module, via):
    """Either way of publishing a model (files on one node, the object store across nodes), a meta skeleton given
    storage and filled from it equals the model, the tied head still tied; closing deletes the files."""
    import os

    import ray

    from curvdist.distributed.materialize import materialize_buffers, materialize_parameters, publish, to_empty

    s = spec("gpt2")
    model = s.build_model()
    weights = publish(ray, model, via)
    skeleton = s.build_skeleton()
    to_empty(skeleton, torch.device("cpu"))
    materialize_buffers(skeleton, weights, torch.device("cpu"))
    values = materialize_parameters(skeleton, [n for n, _ in model.named_parameters()], weights, torch.device("cpu"))
    weights.close()
    assert skeleton.lm_head.weight is skeleton.transformer.wte.weight
    assert set(values) == {n for n, _ in model.named_parameters()}
    for (n, a), (m, b) in zip(model.state_dict().items(), skeleton.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n
    if via == "files":
        assert not os.path.exists(weights.directory)
    with pytest.raises(cd.errors.ConfigError, match="publish via"):
        publish(ray, model, "disk")


BLOCK_METRICS = ("kfac", "kflr", "diag_ggn", "diag_fisher_mc", "empirical_fisher_diag")


@pytest.mark.parametrize("name,stages,micro", [
    ("gpt2", 3, 3), pytest.param("gpt2", 2, 1, marks=pytest.mark.slow),
    pytest.param("llama", 2, 3, marks=pytest.mark.slow), pytest.param("llama", 3, 1, marks=pytest.mark.slow)])
def test_stage_metrics_of_traced_decoders_equal_local(ray_module, name, stages, micro):
    """Kronecker (kfac, kflr, ekfac) and diagonal metrics of a traced decoder, each stage computing the blocks of its own parameters
    from sites in its exported graph (GPT-2's Conv1D addmm and LayerNorm, LLaMA's Linear and its RMSNorm's
    elementwise scale, the embeddings), with the token embedding tied to the head on the last stage: equal to the
    local own-kernel metric (float64, the same sampled labels), and usable by queries."""
    local = spec(name).build()
    pool = StagePool(spec(name), stages, micro_batches=micro)
    problem = PipelineProblem(pool)
    try:
        assert pool.ties and pool.ties[0][1:] == (0, stages - 1)
        v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        space = pool.space
        for kind, options in [*((k, {"mc_samples": 2, "seed": 5} if k in ("kfac", "diag_fisher_mc") else {})
                                for k in BLOCK_METRICS),
                              ("ekfac", {"mc_samples": 2, "seed": 5}), ("ekfac", {"fisher_type": "type2"})]:
            M_local = cd.metric(local, kind, damping=0.1, backend="torch", **options)
            M = cd.metric(problem, kind, damping=0.1, **options)
            assert float((M_local.apply(v) - 0.1 * v).norm()) > 1e-3 * float(v.norm())  # not just the damping
            for method in ("apply", "solve", "inv_sqrt_apply", "inv_factor_t_apply"):
                got = space.to_tensor(getattr(M, method)(space.from_tensor(v)))
                want = getattr(M_local, method)(v)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
            _close(M_local.logdet(), M.logdet(), rel=1e-9)
        M_local = cd.metric(local, "kflr", damping=0.1, backend="torch")
        M = cd.metric(problem, "kflr", damping=0.1)
        _close(cd.eigs(cd.operator(local, "ggn"), k=2, tol=1e-11, metric=M_local).value,
               cd.eigs(PipelineOperator(pool, "ggn"), k=2, tol=1e-11, metric=M).value, rel=1e-9)
    finally:
        pool.shutdown()


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.gain = torch.nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return self.lin(x) @ self.gain  # the gain is a matrix product, not a site


class _Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Scaled(), _Scaled()])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def test_traced_stage_refuses_a_parameter_outside_its_sites():
    """A parameter read by an operator that is not a linear/embedding/normalization site is refused by name and
    operator (its block would silently miss that use); the Linear's own parameters instrument fine."""
    from curvdist.distributed.stacks import TracedProgram

    torch.manual_seed(0)
    model = _Stack().double().eval()
    program = TracedProgram(model, 0, 2, [torch.randn(3, 4, dtype=torch.float64)])
    run, rec = program.with_sites(["blocks.0.lin.weight", "blocks.0.lin.bias"])
    with pytest.raises(cd.MetricError, match=r"blocks\.0\.gain is used by aten\.matmul"):
        program.with_sites(["blocks.0.lin.weight", "blocks.0.gain"])


def test_block_stack_cuts_balance_what_each_stage_holds():
    """Units of a decoder: before the blocks (embeddings), each block, after them (final norm + the tied head,
    which the last stage holds again); cuts end each stage nearest to s/S of the held total."""
    model = spec("gpt2").build_model()
    prefix, blocks = find_blocks(model)
    assert prefix == "transformer.h" and len(blocks) == 3
    per_block = sum(p.numel() for p in blocks[0].parameters())
    wte, wpe = model.transformer.wte.weight.numel(), model.transformer.wpe.weight.numel()
    ln_f = sum(p.numel() for p in model.transformer.ln_f.parameters())
    assert block_units(model, prefix, 3) == [wte + wpe, per_block, per_block, per_block, ln_f + wte]
    assert split_points(model, 1) == [(0, 5)]
    assert balanced_cuts([10, 50, 50, 50, 10], 3) == [(0, 2), (2, 3), (3, 5)]
    assert balanced_cuts([96, 496, 496, 496, 104], 3) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(cd.ProblemError, match="only 5 blocks and end pieces with parameters"):
        split_points(model, 6)
    # by compute: the embedding tables are looked up (no work counted), the tied head multiplies (counted)
    assert block_units(model, prefix, 3, "compute") == [0, per_block, per_block, per_block, ln_f + wte]
    with pytest.raises(cd.ProblemError, match="balance must be one of"):
        split_points(model, 2, "flops")


@pytest.mark.parametrize("balance", ["compute", [2, 1], "time"])
def test_stages_cut_otherwise_equal_local(ray_module, balance):
    """GPT-2 (vocab 12 × 8, blocks of 8 wide) cut by compute, as given (2 blocks, then 1) or by measured time in
    2 stages: each stage owns its units' parameters, and the numbers do not move."""
    s = spec("gpt2")
    model = s.build_model()
    prefix, blocks = find_blocks(model)
    if balance == "compute":
        assert split_points(model, 2, "compute") != split_points(model, 2)
    pool = StagePool(s, 2, micro_batches=2, balance=balance)
    try:
        if balance != "time":  # measured: any split of the 3 blocks, the same on every stage
            assert pool.units == counts_from_cuts(model, split_points(model, 2, balance))
        assert sum(pool.units) == 3
        cuts = split_points(model, 2, pool.units)
        held = block_units(model, prefix, len(blocks))
        assert pool.infos[0]["dim"] == sum(held[cuts[0][0]:cuts[0][1]])  # stage 0 owns its units
        local = s.build()
        _close(cd.eigs(cd.operator(local, "ggn"), k=1, tol=1e-10).value,
               cd.eigs(PipelineOperator(pool, "ggn"), k=1, tol=1e-10).value)
    finally:
        pool.shutdown()


def test_memory_records_of_a_local_problem():
    problem = spec("gpt2").build()
    problem.memory_reset()
    cd.eigs(cd.operator(problem, "ggn"), k=1, tol=1e-6)
    (rec,) = problem.memory_records()
    assert rec["role"] == "local" and rec["parameters"] == problem.dim
    assert rec["window"] == "query" and rec["peak_rss_mb"] >= rec["rss_mb"] > 0


@pytest.mark.slow  # two CLI runs through Ray (about 70 s on 2 cores); the data-mode fault test is in the fast suite
def test_stage_killed_mid_lanczos_gives_the_uninterrupted_numbers(tmp_path):
    """CURVDIST_FAULT makes stage 1 exit in the middle of the 6th product of the eigenvalue solve (its calls are
    a forward and a backward per micro-batch); Ray restarts it, it rebuilds its piece of the decoder, reloads the
    shards it wrote at the start of that product, the coordinator runs the product again, and every number equals
    the uninterrupted run's; the JSON records the retry."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    micro = 2
    cfg = {"seed": 0, "dtype": "float64",
           "model": {"factory": "curvdist.zoo:hf_causal_lm", "kwargs": {"config": CONFIGS["gpt2"], "seed": 1}},
           "data": {"factory": "curvdist.zoo:markov_corpus",
                    "kwargs": {"n": 5, "vocab_size": VOCAB, "max_length": 6, "min_length": 3, "seed": 2},
                    "batch_size": 5},
           "loss": "causal_lm",
           "curvature": {"kind": "ggn"},
           "queries": [{"kind": "eigs", "k": 2, "tol": 1e-10}, {"kind": "trace", "method": "hutchpp", "matvecs": 6}],
           "backend": {"kind": "ray", "mode": "pipeline", "stages": 2, "micro_batches": micro}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def run(name, env):
        proc = subprocess.run([sys.executable, "-m", "curvdist", "run", str(path), "-o", str(tmp_path / name), "-q"],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled", **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name).read_text())

    clean = run("clean.json", {})
    faulty = run("faulty.json", {"CURVDIST_FAULT": f"worker=1,call={2 * micro * 5 + 2}"})
    assert clean["backend"]["retried_stage_products"] == 0
    assert faulty["backend"]["retried_stage_products"] == 1
    assert [r["value"] for r in faulty["results"]] == [r["value"] for r in clean["results"]]
    assert [r["matvecs"] for r in faulty["results"]] == [r["matvecs"] for r in clean["results"]]
    memory = faulty["results"][0]["info"]["memory"]
    assert [m["role"] for m in memory] == ["coordinator", "stage 0", "stage 1"]
