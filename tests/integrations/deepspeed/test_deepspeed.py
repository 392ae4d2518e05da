"""DeepSpeed integration on CPU (gloo), one process and two (``torchrun --nproc_per_node 2``), ZeRO 0-3.

The scenarios run in subprocesses (tests/integrations/deepspeed/scripts/scenarios.py, one launch per world size, every ZeRO stage
in the same launch) and write JSON; ground truth comes from plain curvdist in this process: the same queries on
a single-process Problem over the whole held batch at the parameters the monitor measured, and
``curvdist.optim.RiemannianSGD`` (no DeepSpeed) for the preconditioner.

Tolerances (float32, both runs): monitor values against plain curvdist ≤ 2e-4 relative (observed ≤ 1e-5: the
shards' partial products are summed in a different order, and Lanczos/SLQ amplify float32 rounding); preconditioned
parameters against plain RiemannianSGD ≤ 1e-4 relative to their norm (observed ≲ 3e-6; bf16 runs within 10%,
observed 3-5%). Identical-by-construction quantities (loss
curves with and without the monitor, values across ranks, resumed against uninterrupted runs) are compared exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import curvdist as cd
from curvdist import zoo

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = Path(__file__).resolve().parent / "scripts" / "scenarios.py"
_common = importlib.util.spec_from_file_location("ds_common", SCRIPT.parent / "ds_common.py")
S = importlib.util.module_from_spec(_common)  # the scenarios' model, batches and monitor queries
_common.loader.exec_module(S)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

REL_MONITOR = 2e-4
REL_PARAMS = 1e-4
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


def _launch(tmp: Path, world: int, scenarios: str) -> list[dict]:
    pytest.importorskip("deepspeed")
    out = tmp / f"world{world}"
    if world == 1:
        env = _env()
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        _run([sys.executable, str(SCRIPT), str(out), scenarios], env)
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        _run([torchrun, "--nproc_per_node", str(world), "--master_addr", "127.0.0.1", "--master_port",
              str(_free_port()), str(SCRIPT), str(out), scenarios], _env())
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ds1"), 1, "monitor,optimizer,checkpoint,errors")


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ds2"), 2, "monitor,optimizer,checkpoint")


@pytest.fixture(params=[1, 2], ids=["1proc", "2proc"])
def runs(request) -> list[dict]:
    return request.getfixturevalue("one" if request.param == 1 else "two")


# --------------------------------------------------------------------------- ground truth
def _model_at(flat: list[float]) -> torch.nn.Module:
    model = zoo.mlp(**S.MODEL).eval()
    torch.nn.utils.vector_to_parameters(torch.tensor(flat, dtype=torch.float32), model.parameters())
    return model


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny products run ~20x faster on one intra-op thread than on two when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@_one_thread()
def _reference(flat: list[float]) -> dict[str, float]:
    """The monitor's queries (scenarios.MONITOR) with plain single-process curvdist on the whole held batch."""
    problem = cd.Problem(_model_at(flat), "cross_entropy", S.held())
    H, G = cd.operator(problem, "hessian"), cd.operator(problem, "ggn")
    fisher = cd.metric(problem, "fisher", 0.01)
    q = {q["name"]: q for q in S.MONITOR["queries"]}
    out = {}
    for i, v in enumerate(cd.eigs(H, k=2, seed=0).value):
        out[f"curvdist/eigs/eig{i}"] = v
    fq = q["flatness"]
    flat_r = cd.flatness(G, metric=fisher, matvecs=fq["matvecs"], probes=fq["probes"], steps=fq["steps"], seed=0)
    out.update({f"curvdist/flatness/{k}": v for k, v in flat_r.value.items()})
    out["curvdist/trace_diag/value"] = cd.trace(G, method="hutchpp", matvecs=12, seed=0,
                                                metric=cd.metric(problem, "diag_ggn", 0.001)).value
    out["curvdist/eigs_fisher/eig0"] = cd.eigs(H, k=1, metric=fisher, seed=0).value[0]
    out["curvdist/eigs_kflr/eig0"] = cd.eigs(G, k=1, metric=cd.metric(problem, "kflr", 0.001), seed=0).value[0]
    out["curvdist/grad_norm/value"] = cd.grad_norm(problem, metric=fisher).value
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------- monitor
@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_monitor_equals_single_process_curvdist(runs, stage):
    """Every logged value equals plain curvdist on the whole held batch at the measured parameters."""
    res = runs[0]["monitor"][stage]
    assert [m["step"] for m in res["measured"]] == [2, 4]
    worst = 0.0
    for m in res["measured"]:
        ref = _reference(m["params"])
        assert set(m["values"]) == set(ref)
        for name, expected in ref.items():
            err = _rel(m["values"][name], expected)
            worst = max(worst, err)
            assert err <= REL_MONITOR, (name, m["values"][name], expected)
    print(f"world {runs[0]['world']} ZeRO-{stage}: worst relative deviation {worst:.2e}")


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_monitor_leaves_training_unchanged(runs, stage):
    """Same loss curve and RNG stream as without the monitor, train mode kept, values identical on all ranks,
    scalars written by DeepSpeed's CSV monitor."""
    res = runs[0]["monitor"][stage]
    assert res["losses"] == res["losses_without_monitor"]
    assert res["rng_after"] == res["rng_without_monitor"]
    assert res["training_mode_kept"]
    for other in runs[1:]:
        assert other["monitor"][stage]["measured"] == res["measured"]
        assert other["monitor"][stage]["csv_files"] == []  # only rank 0 writes
    names = {f"{n.replace('/', '_')}.csv" for n in _reference(res["measured"][0]["params"])}
    assert names <= set(res["csv_files"])


# --------------------------------------------------------------------------- ZeRO-3 on the partitions
#: the documented accuracy of partitioned (finite-difference, float32) curvature against exact values
REL_ZERO3 = 1e-4


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ds_zero3"), 2, "zero3")


@_one_thread()
def _zero3_reference(path: str) -> dict[str, float]:
    """The ZeRO-3 monitor's queries in float64 on one process: top eigenvalues converged to 1e-10 (Euclidean, and
    in the KFLR and diagonal-GGN metrics), and Hutch++ with the monitor's seed and budget (the same probes: the
    number the monitor estimates, computed exactly)."""
    model = zoo.mlp(**S.ZERO3_MODEL).double().eval()
    torch.nn.utils.vector_to_parameters(torch.load(path).double(), model.parameters())
    X, y = S.held()
    problem = cd.Problem(model, "cross_entropy", (X.double(), y))
    H, G = cd.operator(problem, "hessian"), cd.operator(problem, "ggn")
    q = {q["name"]: q for q in S.ZERO3_MONITOR["queries"]}
    ref = {"curvdist/eigs_h/eig0": cd.eigs(H, k=1, tol=1e-10, seed=0).value[0],
           "curvdist/eigs_g/eig0": cd.eigs(G, k=1, tol=1e-10, seed=0).value[0],
           "curvdist/trace_g/value": cd.trace(G, "hutchpp", q["trace_g"]["matvecs"], seed=0).value,
           "curvdist/eigs_g_kflr/eig0": cd.eigs(G, k=1, tol=1e-10, seed=0,
                                                metric=cd.metric(problem, "kflr", damping=0.1)).value[0],
           "curvdist/eigs_g_diag/eig0": cd.eigs(G, k=1, tol=1e-10, seed=0,
                                                metric=cd.metric(problem, "diag_ggn", damping=0.1)).value[0]}
    return ref


@pytest.mark.slow  # 105 s (a 1.09M-parameter MLP under ZeRO-3 with finite-difference queries); the fast suite keeps
# ZeRO-3 partitions through test_preconditioner_under_zero3_on_the_partitions (partitioned KFLR blocks, gathers metered)
def test_zero3_partitioned_monitor_equals_exact_without_gathering_the_model(zero3):
    """ZeRO-3 on 2 ranks (torchrun, gloo), the monitor on the engine's partitions: its top Hessian and GGN
    eigenvalues, its GGN trace estimate and the invariant ones — eigenvalues of M⁻¹C with KFLR blocks owned per
    layer and with the diagonal GGN on the pieces — agree with float64 single-process values to REL_ZERO3; no rank ever
    held more than the training step itself held in full (one 512x512 weight plus ZeRO-3's small persistent
    parameters: 28 % of the model), while a gathered replica holds it all; training is unchanged."""
    runs = [r["zero3"] for r in zero3]
    res = runs[0]["monitored"]
    assert res["backend"] == "deepspeed-zero3[2]"
    assert res["losses"] == runs[0]["plain"]["losses"]
    assert [m["step"] for m in res["measured"]] == [2]
    assert runs[1]["monitored"]["measured"][0]["values"] == res["measured"][0]["values"]
    model = res["model_parameters"]
    assert model == sum(p.numel() for p in zoo.mlp(**S.ZERO3_MODEL).parameters())
    for m in res["measured"]:
        ref = _zero3_reference(m["params"])
        assert set(m["values"]) == set(ref)
        for name, expected in ref.items():
            err = _rel(m["values"][name], expected)
            print(f"{name}: {m['values'][name]:.8g} vs {expected:.8g}, relative {err:.1e}")
            assert err <= REL_ZERO3, (name, m["values"][name], expected)
        for info in m["info"]:
            product = info["product"]
            assert product["mode"] == "zero3-finite-difference" and product["method"] == "ridders"
            # every product chose its own step and recorded its error estimate
            per = product["per_product"]
            assert per and product["differences"] == sum(r["differences"] for r in per) >= len(per)
            assert product["error_estimate"] == max(r["error_estimate"] for r in per) <= REL_ZERO3
            lines = info["memory"]
            assert [x["role"] for x in lines] == ["rank 0", "rank 1"]
            assert sum(x["parameters"] for x in lines) == model
            for x in lines:
                assert 0 < x["peak_gathered_parameters"] <= res["training_peak_gathered"]
                assert x["peak_gathered_parameters"] < 0.3 * model
    print(f"peak gathered: measurement {m['info'][0]['memory'][0]['peak_gathered_parameters']}, training step "
          f"{res['training_peak_gathered']}, model {model}; measurement {res['measured'][0]['seconds']:.1f} s")


@pytest.fixture(scope="module")
def zero3_extra(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ds_zero3_extra"), 2, "zero3_extra")


@pytest.mark.slow
@_one_thread()
def test_zero3_partitioned_kfac_flatness_and_cg_metric(zero3_extra):
    """The same MLP under ZeRO-3 on 2 ranks: the GGN's flatness in the sampled KFAC metric (the labels one process
    draws: keyed by the global sample index), the top eigenvalue of M⁻¹GGN in the sampled EKFAC metric, and the top
    eigenvalue of M⁻¹GGN with the GGN metric solved by CG over finite-difference products equal the float64 single-process estimators with the same probes to REL_ZERO3."""
    res = zero3_extra[0]["zero3_extra"]
    assert zero3_extra[1]["zero3_extra"]["values"] == res["values"]
    model = zoo.mlp(**S.ZERO3_MODEL).double().eval()
    torch.nn.utils.vector_to_parameters(torch.load(res["params"]).double(), model.parameters())
    X, y = S.held()
    problem = cd.Problem(model, "cross_entropy", (X.double(), y))
    G = cd.operator(problem, "ggn")
    q = {q["name"]: q for q in S.ZERO3_EXTRA_MONITOR["queries"]}
    f = q["flat_kfac"]
    kfac = cd.metric(problem, "kfac", damping=0.1, **f["metric"]["options"])
    flat = cd.flatness(G, metric=kfac, matvecs=f["matvecs"], probes=f["probes"], steps=f["steps"],
                       logdet_damping=f["logdet_damping"], seed=0)
    ref = {f"curvdist/flat_kfac/{k}": float(v) for k, v in flat.value.items()}
    ref["curvdist/eigs_g_cg/eig0"] = cd.eigs(G, k=1, tol=1e-10, seed=0,
                                             metric=cd.metric(problem, "ggn", damping=1.0)).value[0]
    e = q["eigs_g_ekfac"]["metric"]
    ref["curvdist/eigs_g_ekfac/eig0"] = cd.eigs(G, k=1, tol=1e-10, seed=0,
                                                metric=cd.metric(problem, "ekfac", damping=e["damping"],
                                                                 **e["options"])).value[0]
    assert set(res["values"]) == set(ref)
    for name, expected in ref.items():
        err = _rel(res["values"][name], expected)
        print(f"{name}: {res['values'][name]:.8g} vs {expected:.8g}, relative {err:.1e}")
        assert err <= REL_ZERO3, (name, res["values"][name], expected)


@pytest.fixture(scope="module")
def zero3_gpt2(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ds_zero3_gpt2"), 2, "zero3_gpt2")


@pytest.mark.slow
@_one_thread()
def test_zero3_partitioned_monitor_on_a_tied_gpt2(zero3_gpt2):
    """A Hugging Face GPT-2 (tied head, causal LM loss) under ZeRO-3 on 2 ranks: the monitor's top Hessian and GGN
    eigenvalues, and the invariant ones in the KFLR and EKFAC metrics (the tied embedding/head from both uses'
    statistics, owned by one rank; EKFAC's bases broadcast from their owners), equal float64 single-process values
    to REL_ZERO3. Its top directions are far stiffer than random ones; the step chosen at the first product (not the starting u^{1/3}) is what makes this hold."""
    res = zero3_gpt2[0]["zero3_gpt2"]
    assert zero3_gpt2[1]["zero3_gpt2"]["values"] == res["values"]
    model = zoo.hf_causal_lm(**S.ZERO3_GPT2).double()
    state = {n: t.double() for n, t in torch.load(res["params"]).items()}
    model.load_state_dict(state, strict=False)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # still tied
    ids, labels = S.token_batch()
    problem = cd.Problem(model.eval(), "causal_lm", {"input_ids": ids, "labels": labels})
    for name, kind, metric in [("eigs_h", "hessian", None), ("eigs_g", "ggn", None),
                               ("eigs_g_kflr", "ggn", ("kflr", 0.1, {})),
                               ("eigs_g_ekfac", "ggn", ("ekfac", 0.1, {"fisher_type": "type2"}))]:
        M = None if metric is None else cd.metric(problem, metric[0], damping=metric[1], **metric[2])
        exact = cd.eigs(cd.operator(problem, kind), k=1, tol=1e-10, seed=0, metric=M).value[0]
        got = res["values"][f"curvdist/{name}/eig0"]
        print(f"GPT-2 {name}: {got:.8g} vs {exact:.8g}, relative {_rel(got, exact):.1e}")
        assert _rel(got, exact) <= REL_ZERO3
    for product in res["products"]:  # the stiff top directions took smaller steps than where the walk starts
        assert min(r["h"] for r in product["per_product"]) < 4e-3 / 2 ** 3


# --------------------------------------------------------------------------- preconditioner
@_one_thread()
def _plain_riemannian_sgd(adam: bool = False, momentum: bool = False) -> list[float]:
    """scenarios.preconditioner's (adam_preconditioner's; with ``momentum``, the owners-momentum run's) run with
    curvdist.optim.RiemannianSGD alone (one process, no DeepSpeed)."""
    model = zoo.mlp(**S.MODEL)
    options = dict(metric="adam", lr=0.02, damping=1e-3) if adam else dict(metric="kflr", lr=0.3, damping=0.05,
                                                                            refresh=2)
    if momentum:
        options.update(momentum=0.5, kl_clip=S.MOMENTUM_KL_CLIP)
    opt = cd.optim.RiemannianSGD(model, "cross_entropy", zoo.digits(split="train", n=48), **options)
    X, y = S.train_data()
    for s in range(6):
        lo = s * S.GLOBAL_BATCH
        opt.zero_grad()
        F.cross_entropy(model(X[lo:lo + S.GLOBAL_BATCH]), y[lo:lo + S.GLOBAL_BATCH]).backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).tolist()


@_one_thread()
def _plain_step_statistics() -> np.ndarray:
    """scenarios.step_statistics_run with curvdist.optim.RiemannianSGD alone: one process, KFLR statistics tracked
    on the two accumulated micro-batches of every global batch."""
    model = zoo.mlp(**S.MODEL)
    opt = cd.optim.RiemannianSGD(model, "cross_entropy", metric="kflr", lr=0.3, damping=0.05, refresh=2,
                                 statistics="step", decay=S.STEP_DECAY)
    X, y = S.train_data()
    half = S.GLOBAL_BATCH // 2
    for s in range(6):
        opt.zero_grad()
        for m in range(2):
            a = s * S.GLOBAL_BATCH + m * half
            with opt.track(y[a:a + half]):
                loss = F.cross_entropy(model(X[a:a + half]), y[a:a + half]) / 2
            loss.backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()


def test_preconditioner_statistics_from_the_training_step(two):
    """ZeRO-2 on 2 ranks with gradient accumulation 2: statistics='step' tracks each rank's micro-batches in the
    training forward passes, reduces a step's sums over the ranks and keeps their moving average; one owner per
    parameter. The steps equal one process's RiemannianSGD(statistics='step') over the same global batches."""
    res = two[0]["optimizer"]["2-step"]
    assert two[1]["optimizer"]["2-step"]["params"] == res["params"] and res["steps"] == 6
    plain = _plain_step_statistics()
    initial = torch.nn.utils.parameters_to_vector(zoo.mlp(**S.MODEL).parameters()).detach().numpy()
    assert np.linalg.norm(plain - initial) > 1.0  # the steps moved the parameters
    deviation = np.linalg.norm(np.array(res["params"]) - plain) / np.linalg.norm(plain)
    print(f"step statistics, ZeRO-2 x 2 ranks, accumulation 2: relative deviation {deviation:.2e}")
    assert deviation <= REL_PARAMS


@pytest.fixture(scope="module")
def plain_params() -> dict[str, np.ndarray]:
    return {"kflr": np.array(_plain_riemannian_sgd()), "adam": np.array(_plain_riemannian_sgd(adam=True)),
            "momentum": np.array(_plain_riemannian_sgd(momentum=True))}


def _train_loss(flat: list[float]) -> float:
    X, y = S.train_data()
    with torch.no_grad():
        return float(F.cross_entropy(_model_at(flat)(X), y))


@pytest.mark.parametrize("config", ["0", "1", "2", "0-bf16", "1-bf16", "2-adam"])
def test_preconditioner_as_client_optimizer(runs, config, plain_params):
    """DeepSpeedRiemannianSGD under ZeRO 0-2 (and bf16) takes the steps of plain RiemannianSGD on the same global
    batches, decreases the loss, and keeps the parameters identical across ranks."""
    res = runs[0]["optimizer"][config]
    params = np.array(res["params"])
    plain_params = plain_params["adam" if "adam" in config else "momentum" if "momentum" in config else "kflr"]
    for other in runs[1:]:
        assert other["optimizer"][config]["params"] == res["params"]
    initial = torch.nn.utils.parameters_to_vector(zoo.mlp(**S.MODEL).parameters()).tolist()
    assert _train_loss(res["params"]) < 0.9 * _train_loss(initial)
    deviation = np.linalg.norm(params - plain_params) / np.linalg.norm(plain_params)
    print(f"world {runs[0]['world']} {config}: relative deviation from plain RiemannianSGD {deviation:.2e}")
    assert deviation <= (0.1 if "bf16" in config else REL_PARAMS)  # bf16 weights: only close to the fp32 run


@pytest.mark.parametrize("config", ["2-owners", "1-owners-momentum"])
def test_preconditioner_with_one_owner_per_parameter(two, config, plain_params):
    """ZeRO 1/2 on 2 ranks with grad_worker_fraction 0.5: each parameter has one owner (assigned by cost), which
    alone receives its reduced gradient and forms and inverts its KFLR block; the steps equal plain RiemannianSGD's
    (with momentum and KL clipping too), while no rank held more than one parameter's gradient in full."""
    res = two[0]["optimizer"][config]
    assert two[1]["optimizer"][config]["params"] == res["params"]
    plan = res["plan"]
    assert plan["owners_per_parameter"] == 1
    owned = [set(plan["owned"][str(r)]) for r in range(2)]
    names = [n for n, _ in zoo.mlp(**S.MODEL).named_parameters()]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(names) and all(owned)
    sizes = [p.numel() for p in zoo.mlp(**S.MODEL).parameters()]
    assert res["peak_gradient_entries"] == max(sizes) < sum(sizes)
    expected = plain_params["momentum" if "momentum" in config else "kflr"]
    deviation = np.linalg.norm(np.array(res["params"]) - expected) / np.linalg.norm(expected)
    print(f"{config}: relative deviation from plain RiemannianSGD {deviation:.2e}")
    assert deviation <= REL_PARAMS


def test_preconditioner_under_zero3_on_the_partitions(two, plain_params):
    """ZeRO-3 on 2 ranks, every parameter partitioned: DeepSpeedRiemannianSGD (attached to its engine) with KFLR
    blocks formed per layer at one owner from the engine's own passes takes plain RiemannianSGD's steps, and never
    held more parameter entries in full than a training step did (less than the model)."""
    res = two[0]["optimizer"]["3"]
    assert two[1]["optimizer"]["3"]["params"] == res["params"]
    deviation = np.linalg.norm(np.array(res["params"]) - plain_params["kflr"]) / np.linalg.norm(plain_params["kflr"])
    print(f"ZeRO-3: relative deviation {deviation:.2e}; gathered at once: preconditioner "
          f"{res['preconditioner_peak_gathered']}, training {res['training_peak_gathered']}, model "
          f"{res['model_parameters']}")
    assert deviation <= REL_PARAMS
    assert 0 < res["preconditioner_peak_gathered"] <= res["training_peak_gathered"] < res["model_parameters"]


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_continues_the_curves(runs):
    """Save at step 3 (mid refresh period), load into a fresh engine with other weights, go on: the loss curve
    and the monitor history equal the uninterrupted run's."""
    for r in runs:
        c = r["checkpoint"]
        assert c["resumed_losses"] == c["full_losses"]
        assert c["resumed_history"] == c["full_history"]
        assert [h["step"] for h in c["full_history"]] == [2, 4, 6]


# --------------------------------------------------------------------------- bad input
def test_monitor_configured_from_python(one):
    spec = one[0]["errors"]["python_spec"]
    assert spec["every"] == 3 and spec["names"] == ["g", "eigs_hessian_diag_ggn+0.1"]
    assert set(spec["values"]) == {"curvdist/g/value", "curvdist/eigs_hessian_diag_ggn+0.1/eig0"}


def test_bad_input_in_a_deepspeed_run(one):
    kind, msg = one[0]["errors"]["adam_zero3"]
    assert kind == "ConfigError" and "adam" in msg and "ZeRO stage 3" in msg
    kind, msg = one[0]["errors"]["no_section"]
    assert kind == "ConfigError" and "no 'curvdist' section" in msg
    kind, msg = one[0]["errors"]["preconditioner_zero3"]
    assert kind == "ConfigError" and "ZeRO-3" in msg and "attach(engine)" in msg
    for key, what in [("partitioned_metric", "empirical_fisher+0.1"), ("partitioned_grad_norm", "grad_norm"),
                      ("partitioned_curvature", "fisher curvature")]:
        kind, msg = one[0]["errors"][key]
        assert kind == "ConfigError" and what in msg and "zero3: gather" in msg, msg


def test_monitor_refuses_a_plain_module():
    pytest.importorskip("deepspeed")
    from curvdist.integrations.deepspeed import CurvatureMonitor

    with pytest.raises(cd.ConfigError, match=r"DeepSpeedEngine.*torch\.nn\.modules\.linear\.Linear"):
        CurvatureMonitor(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))


def test_config_section_errors(tmp_path):
    from curvdist.integrations.deepspeed import read_section
    from curvdist.integrations.deepspeed.queries import check_query
    from curvdist.queries.specs import DensityQuery, EigsQuery, MetricSpec

    with pytest.raises(cd.ConfigError, match="no 'curvdist' section"):
        read_section({"train_batch_size": 8})
    with pytest.raises(cd.ConfigError, match=r"curvdist\.monitor\.queries\.0\.k"):
        read_section({"curvdist": {"monitor": {"queries": [{"kind": "eigs", "k": 0}]}}})
    with pytest.raises(cd.ConfigError, match=r"unknown key 'curvdist\.monitor\.evry'"):
        read_section({"curvdist": {"monitor": {"evry": 5}}})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"curvdist": {"monitor": {"every": 5, "queries": [
        {"kind": "flatness", "name": "flat", "metric": {"kind": "fisher", "damping": 0.01}}]}}}))
    section = read_section(str(path))
    assert section.monitor.every == 5 and section.monitor.names == ["flat"] and section.preconditioner is None
    with pytest.raises(cd.ConfigError, match="density"):
        check_query(DensityQuery(kind="density"), MetricSpec(), 0)
    with pytest.raises(cd.ConfigError, match="pullback"):
        check_query(EigsQuery(kind="eigs"), MetricSpec(kind="pullback"), 0)


def test_without_deepspeed_curvdist_imports_and_the_integration_says_how_to_install():
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import curvdist, curvdist.integrations.deepspeed as d\n"
        "try:\n"
        "    d.CurvatureMonitor(object(), None)\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("DependencyError") and "pip install 'curvdist[deepspeed]'" in proc.stdout


def test_import_curvdist_does_not_import_deepspeed():
    code = "import sys, curvdist, curvdist.integrations.deepspeed; print('deepspeed' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------- slow: transformer, launcher
@_one_thread()
def _transformer_reference(flat: list[float]) -> dict[str, float]:
    model = zoo.transformer(**S.TRANSFORMER).eval()
    torch.nn.utils.vector_to_parameters(torch.tensor(flat, dtype=torch.float32), model.parameters())
    X, y = S.sequence_data("test", S.HELD)
    problem = cd.Problem(model.double(), "cross_entropy", (X.double(), y))
    H, G = cd.operator(problem, "hessian"), cd.operator(problem, "ggn")
    out = {f"curvdist/eigs/eig{i}": v for i, v in enumerate(cd.eigs(H, k=2, seed=0).value)}
    out["curvdist/eigs_fisher/eig0"] = cd.eigs(H, k=1, metric=cd.metric(problem, "fisher", 0.01), seed=0).value[0]
    out["curvdist/trace_diag/value"] = cd.trace(G, method="hutchpp", matvecs=10, seed=0,
                                                metric=cd.metric(problem, "diag_ggn", 0.01)).value
    out["curvdist/grad_norm_ef/value"] = cd.grad_norm(
        problem, metric=cd.metric(problem, "empirical_fisher_diag", 0.01)).value
    return out


@pytest.mark.slow
def test_transformer_under_zero3_two_ranks_float64(tmp_path):
    """The tiny transformer (LayerNorm, attention) trained in float32 under ZeRO-3 on 2 ranks, monitored in float64:
    equal to single-process float64 curvdist to 1e-9."""
    runs = _launch(tmp_path, 2, "transformer")
    res = runs[0]["transformer"]["3"]
    assert runs[1]["transformer"]["3"]["measured"] == res["measured"]
    assert [m["step"] for m in res["measured"]] == [2, 4]
    for m in res["measured"]:
        ref = _transformer_reference(m["params"])
        for name, expected in ref.items():
            assert _rel(m["values"][name], expected) <= 1e-9, (name, m["values"][name], expected)


@pytest.mark.slow
def test_launcher_resume_continues_the_curves(tmp_path):
    """launchers/deepspeed/train.py under torchrun: 40 steps, checkpoint, resume to 60 = 60 uninterrupted steps."""
    pytest.importorskip("deepspeed")
    config = json.loads((ROOT / "launchers" / "deepspeed" / "ds_config.json").read_text())
    config["csv_monitor"]["output_path"] = str(tmp_path / "csv")
    config["curvdist"]["monitor"]["every"] = 20
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(config))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    script = str(ROOT / "launchers" / "deepspeed" / "train.py")

    def train(out: str, *extra: str) -> None:
        _run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
              script, "--config", str(cfg), "--held", "64", "--out", str(tmp_path / out), *extra], _env())

    train("full", "--steps", "60")
    train("resumed", "--steps", "40", "--save-every", "40")
    train("resumed", "--steps", "60", "--resume")
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert resumed["losses"] == full["losses"] and len(full["losses"]) == 60
    assert [h["values"] for h in resumed["history"]] == [h["values"] for h in full["history"]]
    assert [h["step"] for h in full["history"]] == [20, 40, 60]
    assert full["losses"][-1][1] < 0.5 * full["losses"][0][1]
    assert (tmp_path / "csv" / "digits" / "curvdist_sharpness_fisher_eig0.csv").is_file()


def test_partitioned_curvature_refuses_low_precision_partitions():
    """Finite differences in bfloat16/float16 would be ~1e-2 wrong: refused with the way out."""
    from curvdist.integrations.deepspeed.finite_difference import check_dtype

    check_dtype(torch.float32)
    check_dtype(torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(cd.ConfigError, match=r"float32 or float64 parameters.*partitions.*zero3: gather"):
            check_dtype(dtype)


def test_preconditioner_refuses_what_it_cannot_do_correctly():
    """A grad_worker_fraction outside (0, 1] is refused at construction; under ZeRO-3 with momentum the per-rank
    momentum pieces cannot go through DeepSpeed's client_state (one rank's copy): checkpointing is refused."""
    from curvdist.integrations.deepspeed import DeepSpeedRiemannianSGD
    from curvdist.optim.riemannian_sgd import STATE_KEY

    data = zoo.digits(split="train", n=16)
    for f in (0.0, 1.5):
        with pytest.raises(cd.ConfigError, match="grad_worker_fraction must lie in"):
            DeepSpeedRiemannianSGD(zoo.mlp(**S.MODEL), "cross_entropy", data, metric="kflr", grad_worker_fraction=f)
    opt = DeepSpeedRiemannianSGD(zoo.mlp(**S.MODEL), "cross_entropy", data, metric="kflr", momentum=0.5)
    assert opt.curvdist_state_dict()["momentum_buffer"] is None
    opt._parts = object()  # as after a ZeRO-3 step: the state lives on this rank's partitions
    assert opt.curvdist_state_dict()["step"] == 0  # no momentum yet: the state is the same on every rank
    opt.state[STATE_KEY]["momentum_buffer"] = torch.zeros(5)
    with pytest.raises(cd.ConfigError, match="ZeRO-3.*momentum.*not supported"):
        opt.curvdist_state_dict()
