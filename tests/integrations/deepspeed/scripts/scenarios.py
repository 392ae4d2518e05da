"""DeepSpeed scenarios for tests/integrations/deepspeed/test_deepspeed.py, run in one process (RANK/WORLD_SIZE/MASTER_* set by the test)
or under ``torchrun --nproc_per_node 2``. Each rank writes ``<out>.rank<r>.json``.

    python scenarios.py OUT SCENARIO[,SCENARIO...] [--stages 0,1,2,3]

Scenarios: monitor (per ZeRO stage: a short training run with the monitor, its values and the parameters they were
measured at, and the same run without the monitor), optimizer (DeepSpeedRiemannianSGD under ZeRO 0-2, fp32 and
bf16), checkpoint (an uninterrupted run against save → new engine → load → continue), errors (what must fail).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from ds_common import (  # the script's own folder is on sys.path when it runs as a script
    GLOBAL_BATCH,
    HELD,
    MODEL,
    MOMENTUM_KL_CLIP,
    STEP_DECAY,
    MONITOR,
    TRANSFORMER,
    TRANSFORMER_MONITOR,
    ZERO3_CONFIG,
    ZERO3_OPTIMIZER_CONFIG,
    ZERO3_EXTRA_MONITOR,
    ZERO3_GPT2,
    ZERO3_GPT2_MONITOR,
    ZERO3_MODEL,
    ZERO3_MONITOR,
    held,
    sequence_data,
    token_batch,
    train_data,
)

from curvdist import zoo
from curvdist.integrations.deepspeed import (
    CurvatureMonitor,
    DeepSpeedRiemannianSGD,
    load_checkpoint,
    save_checkpoint,
)
from curvdist.integrations.deepspeed.partitions import GatherMeter

# DeepSpeed's CPU backend compiles its shared-memory all-reduce op (deepspeed_shm_comm) when it initializes, about
# 35 s on 2 cores the first time in a virtual environment (cached in ~/.cache/torch_extensions). Only its
# inference_all_reduce uses the op, and neither curvdist nor these scenarios call that, so the scenarios skip the
# build: a fresh checkout's test run paid it every time.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ds_config(stage: int, bf16: bool = False, monitor: dict | None = None, csv_dir: str | None = None,
              zero: dict | None = None) -> dict:
    _, world = rank_world()
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
           "zero_optimization": zero or {"stage": stage}, "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": bf16}, "steps_per_print": 10**6, "gradient_clipping": 0.0}
    if monitor is not None:
        cfg["curvdist"] = {"monitor": monitor}
    if csv_dir is not None:
        cfg["csv_monitor"] = {"enabled": True, "output_path": csv_dir, "job_name": "curvdist"}
    return cfg


def local_batch(X: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global batch ``step`` (identical global batches for any world size)."""
    rank, world = rank_world()
    lo = (step * GLOBAL_BATCH) % X.shape[0]
    Xg, yg = X[lo:lo + GLOBAL_BATCH], y[lo:lo + GLOBAL_BATCH]
    per = GLOBAL_BATCH // world
    return Xg[rank * per:(rank + 1) * per], yg[rank * per:(rank + 1) * per]


def full_params(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.float().reshape(-1) for _, p in _gathered(module)]).tolist()


def train(engine, steps: int, start: int = 0, monitor: CurvatureMonitor | None = None) -> dict:
    X, y = train_data()
    losses, measured, modes = [], [], []
    dtype = next(engine.module.parameters()).dtype
    for s in range(start, start + steps):
        xb, yb = local_batch(X, y, s)
        loss = F.cross_entropy(engine(xb.to(dtype)), yb)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if monitor is not None:
            values = monitor.step()
            modes.append(engine.module.training)
            if values is not None:
                measured.append({"step": int(engine.global_steps), "values": values,
                                 "params": full_params(engine.module)})
    return {"losses": losses, "measured": measured, "training_mode_kept": all(modes)}


def engine_for(stage: int, bf16: bool = False, optimizer=None, model=None, monitor: dict | None = None,
               csv_dir: str | None = None):
    model = zoo.mlp(**MODEL) if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.2) if optimizer is None else optimizer(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, bf16, monitor, csv_dir))
    return engine, opt


def scenario_monitor(stages: list[int]) -> dict:
    out = {}
    for stage in stages:
        csv_dir = tempfile.mkdtemp(prefix="csv-", dir=Path(os.environ["CURVDIST_OUT"]).parent)
        engine, _ = engine_for(stage, monitor=MONITOR, csv_dir=csv_dir)
        torch.manual_seed(123)
        monitor = CurvatureMonitor(engine, held())  # reads the curvdist section of the DeepSpeed config
        t0 = time.perf_counter()
        with_monitor = train(engine, 4, monitor=monitor)
        seconds = time.perf_counter() - t0
        rng_after = torch.rand(3).tolist()
        engine2, _ = engine_for(stage)
        torch.manual_seed(123)
        without = train(engine2, 4)
        rng_plain = torch.rand(3).tolist()
        csv_files = sorted(p.name for p in Path(csv_dir).rglob("*.csv"))
        out[str(stage)] = {**with_monitor, "losses_without_monitor": without["losses"], "rng_after": rng_after,
                           "rng_without_monitor": rng_plain, "csv_files": csv_files, "seconds": seconds,
                           "measure_seconds": [h["seconds"] for h in monitor.history],
                           "names": monitor.names}
    return out


def preconditioner(model: torch.nn.Module) -> DeepSpeedRiemannianSGD:
    return DeepSpeedRiemannianSGD(model, "cross_entropy", zoo.digits(split="train", n=48), metric="kflr",
                                  lr=0.3, damping=0.05, refresh=2)


def adam_preconditioner(model: torch.nn.Module) -> DeepSpeedRiemannianSGD:
    return DeepSpeedRiemannianSGD(model, "cross_entropy", zoo.digits(split="train", n=48), metric="adam",
                                  lr=0.02, damping=1e-3)


def owners_preconditioner(model: torch.nn.Module, **extra) -> DeepSpeedRiemannianSGD:
    """One owner per parameter at world 2 (grad_worker_fraction 0.5)."""
    return DeepSpeedRiemannianSGD(model, "cross_entropy", zoo.digits(split="train", n=48), metric="kflr",
                                  lr=0.3, damping=0.05, refresh=2, grad_worker_fraction=0.5, **extra)


def scenario_optimizer(stages: list[int]) -> dict:
    out = {}
    _, world = rank_world()
    owner_runs = [(2, "owners", {}), (1, "owners-momentum", {"momentum": 0.5, "kl_clip": MOMENTUM_KL_CLIP})]
    for stage, key, extra in owner_runs if world > 1 else []:  # one owner per parameter: 2 ranks
        if stage in stages:
            engine, opt = engine_for(stage, optimizer=lambda m, extra=extra: owners_preconditioner(m, **extra))
            res = train(engine, 6)
            out[f"{stage}-{key}"] = {**res, "params": full_params(engine.module),
                                     "peak_gradient_entries": opt.peak_gradient_entries,
                                     "plan": opt._owner_plan().describe()}
    if 3 in stages and world > 1:
        out["3"] = zero3_preconditioned()
    if 2 in stages and world > 1:
        out["2-step"] = step_statistics_run()
    if 2 in stages:
        engine, _ = engine_for(2, optimizer=adam_preconditioner)
        res = train(engine, 6)
        out["2-adam"] = {**res, "params": full_params(engine.module)}
    for stage, bf16 in [(s, False) for s in stages if s <= 2] + [(s, True) for s in stages if s <= 1]:
        engine, _ = engine_for(stage, bf16, optimizer=preconditioner)
        res = train(engine, 6)
        res["params"] = full_params(engine.module)
        out[f"{stage}{'-bf16' if bf16 else ''}"] = res
    return out


def step_statistics_run() -> dict:
    """ZeRO-2 on 2 ranks, gradient accumulation 2: KFLR statistics from the training step's own forward passes
    (each rank tracks its micro-batches; the step's sums are reduced over the ranks), one owner per parameter."""
    rank, world = rank_world()
    model = zoo.mlp(**MODEL)
    opt = DeepSpeedRiemannianSGD(model, "cross_entropy", metric="kflr", lr=0.3, damping=0.05, refresh=2,
                                 statistics="step", decay=STEP_DECAY, grad_worker_fraction=0.5)
    cfg = {**ds_config(2), "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (2 * world),
           "gradient_accumulation_steps": 2}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    X, y = train_data()
    per = GLOBAL_BATCH // (2 * world)
    for s in range(6):
        lo = (s * GLOBAL_BATCH) % X.shape[0]
        for m in range(2):  # micro-batch m: rows [lo + 8m, lo + 8m + 8) of the global batch, split over the ranks
            a = lo + m * GLOBAL_BATCH // 2 + rank * per
            with opt.track(y[a:a + per]):
                loss = F.cross_entropy(engine(X[a:a + per]), y[a:a + per])
            engine.backward(loss)
            engine.step()
    return {"params": full_params(engine.module), "steps": opt.steps, "peak_gradient_entries": opt.peak_gradient_entries}


def metered_step(engine, meter: GatherMeter, xb: torch.Tensor, yb: torch.Tensor) -> float:
    """One training step of a ZeRO-3 engine, the meter sampling the parameter entries held in full before every
    module's forward and whenever backward hands over a gradient; returns the loss."""
    hooks = [p.register_hook(lambda g, m=meter: (m.sample(), g)[1]) for p in meter.params]
    with meter.watching(engine.module):
        loss = F.cross_entropy(engine(xb), yb)
        engine.backward(loss)
    for h in hooks:
        h.remove()
    engine.step()
    return float(loss)


def zero3_preconditioned() -> dict:
    """DeepSpeedRiemannianSGD (KFLR) under ZeRO-3 with every parameter partitioned: the parameters after 6 steps,
    and the most parameter entries held in full at once by a training step and by the preconditioner."""
    model = zoo.mlp(**MODEL)
    opt = preconditioner(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=ds_config(3, zero=ZERO3_OPTIMIZER_CONFIG))
    opt.attach(engine)
    X, y = train_data()
    params = list(engine.module.parameters())
    meter = GatherMeter(params)
    losses = []
    for s in range(6):
        losses.append(metered_step(engine, meter, *local_batch(X, y, s)))
    return {"losses": losses, "params": full_params(engine.module), "training_peak_gathered": meter.peak,
            "preconditioner_peak_gathered": opt.peak_gathered,
            "model_parameters": sum(int(p.ds_numel) for p in params)}


def scenario_checkpoint(stages: list[int]) -> dict:
    stage = 1 if 1 in stages else stages[0]
    monitor_spec = {**MONITOR, "queries": MONITOR["queries"][:2]}
    engine, opt = engine_for(stage, optimizer=preconditioner, monitor=monitor_spec)
    monitor = CurvatureMonitor(engine, held())
    full = train(engine, 6, monitor=monitor)
    full_history = monitor.state_dict()["history"]

    rank, _ = rank_world()
    ckpt = os.environ["CURVDIST_CKPT_DIR"]
    engine, opt = engine_for(stage, optimizer=preconditioner, monitor=monitor_spec)
    monitor = CurvatureMonitor(engine, held())
    first = train(engine, 3, monitor=monitor)
    save_checkpoint(engine, ckpt, tag="step3", monitor=monitor, optimizer=opt)
    engine, opt = engine_for(stage, optimizer=preconditioner, monitor=monitor_spec,
                             model=zoo.mlp(**{**MODEL, "seed": 99}))
    monitor = CurvatureMonitor(engine, held())
    load_checkpoint(engine, ckpt, tag="step3", monitor=monitor, optimizer=opt)
    second = train(engine, 3, start=3, monitor=monitor)
    return {"stage": stage, "full_losses": full["losses"], "resumed_losses": first["losses"] + second["losses"],
            "full_history": [{k: h[k] for k in ("step", "values")} for h in full_history],
            "resumed_history": [{k: h[k] for k in ("step", "values")} for h in monitor.state_dict()["history"]],
            "rank": rank}


def scenario_errors(stages: list[int]) -> dict:
    out = {}
    engine, _ = engine_for(3)
    try:
        CurvatureMonitor(engine, held(), {"queries": [{"kind": "eigs", "metric": "adam"}]})
        out["adam_zero3"] = None
    except Exception as e:  # noqa: BLE001 - the test checks type and message
        out["adam_zero3"] = [type(e).__name__, str(e)]
    m = CurvatureMonitor(engine, held(), {"queries": [{"kind": "grad_norm", "name": "g"}, {"kind": "eigs"}]},
                         every=3, metric={"kind": "diag_ggn", "damping": 0.1}, zero3="gather")
    for key, query in [("partitioned_metric", {"kind": "eigs", "metric": {"kind": "empirical_fisher",
                                                                          "damping": 0.1}}),
                       ("partitioned_grad_norm", {"kind": "grad_norm"}),
                       ("partitioned_curvature", {"kind": "trace", "curvature": "fisher"})]:
        try:
            CurvatureMonitor(engine, held(), {"queries": [query]})
            out[key] = None
        except Exception as e:  # noqa: BLE001
            out[key] = [type(e).__name__, str(e)]
    out["python_spec"] = {"every": m.spec.every, "names": m.names, "values": m.measure()}
    try:
        CurvatureMonitor(engine, held())  # the config has no curvdist section
        out["no_section"] = None
    except Exception as e:  # noqa: BLE001
        out["no_section"] = [type(e).__name__, str(e)]
    try:
        engine, _ = engine_for(3, optimizer=preconditioner)  # not attached to its engine
        train(engine, 1)
        out["preconditioner_zero3"] = None
    except Exception as e:  # noqa: BLE001
        out["preconditioner_zero3"] = [type(e).__name__, str(e)]
    return out


def scenario_transformer(stages: list[int]) -> dict:
    """The tiny transformer block with a float64 monitor (training in float32)."""
    out = {}
    X, y = sequence_data("train", GLOBAL_BATCH * 8)
    rank, world = rank_world()
    for stage in stages:
        engine, _ = engine_for(stage, model=zoo.transformer(**TRANSFORMER), monitor=TRANSFORMER_MONITOR)
        monitor = CurvatureMonitor(engine, sequence_data("test", HELD))
        measured = []
        for s in range(4):
            per = GLOBAL_BATCH // world
            lo = s * GLOBAL_BATCH + rank * per
            loss = F.cross_entropy(engine(X[lo:lo + per]), y[lo:lo + per])
            engine.backward(loss)
            engine.step()
            values = monitor.step()
            if values is not None:
                measured.append({"step": int(engine.global_steps), "values": values,
                                 "params": full_params(engine.module)})
        out[str(stage)] = {"measured": measured}
    return out


def scenario_zero3(stages: list[int]) -> dict:
    """ZeRO-3 curvature on the partitions: a short run with the monitor (values, the parameters they were measured
    at, the most parameter entries any rank held in full during a measurement and during a training step), and the
    same run without the monitor."""
    rank, _ = rank_world()
    X, y = train_data()
    out: dict = {}
    for monitored in (True, False):
        model = zoo.mlp(**ZERO3_MODEL)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
                                          config=ds_config(3, zero=ZERO3_CONFIG))
        monitor = CurvatureMonitor(engine, held(), ZERO3_MONITOR) if monitored else None
        params = list(engine.module.parameters())
        meter = GatherMeter(params)
        losses, measured = [], []
        for s in range(3):
            losses.append(metered_step(engine, meter, *local_batch(X, y, s)))
            values = monitor.step() if monitor is not None else None
            if values is not None:
                flat = torch.tensor(full_params(engine.module))
                path = f"{os.environ['CURVDIST_OUT']}.zero3.step{int(engine.global_steps)}.pt"
                if rank == 0:
                    torch.save(flat, path)
                info = [{"query": r.query, "curvature": r.curvature, "product": r.info.get("product"),
                         "memory": r.info["memory"]}
                        for r in monitor.results]
                measured.append({"step": int(engine.global_steps), "values": values, "params": path,
                                 "info": info, "seconds": monitor.history[-1]["seconds"]})
        key = "monitored" if monitored else "plain"
        out[key] = {"losses": losses, "measured": measured, "training_peak_gathered": meter.peak,
                    "model_parameters": sum(int(p.ds_numel) for p in params),
                    "backend": monitor.results[0].backend if monitor is not None else None}
    return out


def scenario_zero3_extra(stages: list[int]) -> dict:
    """The ZeRO-3 MLP at its initial weights: one partitioned measurement of ZERO3_EXTRA_MONITOR."""
    rank, _ = rank_world()
    model = zoo.mlp(**ZERO3_MODEL)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config(3, zero=ZERO3_CONFIG))
    monitor = CurvatureMonitor(engine, held(), ZERO3_EXTRA_MONITOR)
    values = monitor.measure()
    path = f"{os.environ['CURVDIST_OUT']}.zero3_extra.pt"
    flat = torch.tensor(full_params(engine.module))
    if rank == 0:
        torch.save(flat, path)
    return {"values": values, "params": path, "products": [r.info.get("product") for r in monitor.results],
            "seconds": monitor.history[-1]["seconds"]}


def scenario_zero3_gpt2(stages: list[int]) -> dict:
    """The tiny GPT-2 under ZeRO-3 at its initial weights: one partitioned measurement."""
    rank, world = rank_world()
    ids, labels = token_batch()
    model = zoo.hf_causal_lm(**ZERO3_GPT2)
    cfg = {**ds_config(3), "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=cfg)
    monitor = CurvatureMonitor(engine, (ids, labels), ZERO3_GPT2_MONITOR)
    values = monitor.measure()
    path = f"{os.environ['CURVDIST_OUT']}.zero3_gpt2.pt"
    state = {n: p.detach().clone() for n, p in _gathered(engine.module)}
    if rank == 0:
        torch.save(state, path)
    return {"values": values, "params": path,
            "products": [r.info.get("product") for r in monitor.results]}


def _gathered(module: torch.nn.Module) -> list:
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None):
        return [(n, p.detach().clone()) for n, p in module.named_parameters()]


SCENARIOS = {"monitor": scenario_monitor, "optimizer": scenario_optimizer, "checkpoint": scenario_checkpoint,
             "errors": scenario_errors,
             "transformer": scenario_transformer, "zero3": scenario_zero3, "zero3_extra": scenario_zero3_extra,
             "zero3_gpt2": scenario_zero3_gpt2}


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2].split(",")
    stages = [0, 1, 2, 3]
    if "--stages" in sys.argv:
        stages = [int(s) for s in sys.argv[sys.argv.index("--stages") + 1].split(",")]
    rank, world = rank_world()
    os.environ.setdefault("CURVDIST_CKPT_DIR", f"{out_path}.ckpt")
    os.environ.setdefault("CURVDIST_OUT", out_path)
    doc = {"rank": rank, "world": world, "seconds": {}}
    for name in names:
        t0 = time.perf_counter()
        doc[name] = SCENARIOS[name](stages)
        doc["seconds"][name] = time.perf_counter() - t0
    Path(f"{out_path}.rank{rank}.json").write_text(json.dumps(doc))
    if torch.distributed.is_initialized():  # every rank done before any tears the group down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # the results are written: leave without the interpreter's teardown, where a rank occasionally aborted in native
    # code (a joinable thread at shutdown; as in tests/problem/two_ranks.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
