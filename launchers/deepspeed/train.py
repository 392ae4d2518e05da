"""Train the digits MLP (or the tiny transformer) with DeepSpeed, curvdist's curvature monitor and, if the config
asks for it, the Riemannian preconditioner as client optimizer.

CPU, two processes (gloo):
    torchrun --nproc_per_node 2 launchers/deepspeed/train.py --config launchers/deepspeed/ds_config.json
GPU hosts:
    deepspeed --num_gpus N launchers/deepspeed/train.py --config launchers/deepspeed/ds_config.json

Each rank trains on its shard of the training split; the monitor's held batch is the first ``--held`` test images
(the same on every rank: the ranks split it and reduce over the data-parallel group). Rank 0 writes
``OUT/history.json`` (the monitor's history, the loss curve, the config); DeepSpeed's CSV monitor writes one file per
scalar under the config's ``csv_monitor.output_path``. ``--save-every``/``--resume`` checkpoint to ``OUT/checkpoints``
with the monitor history and the preconditioner state.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

from curvdist import zoo
from curvdist.integrations.deepspeed import (
    CurvatureMonitor,
    DeepSpeedRiemannianSGD,
    load_checkpoint,
    read_section,
    save_checkpoint,
)
from curvdist.integrations.deepspeed.engine import raw_config

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "ds_config.json"), help="DeepSpeed JSON with a curvdist section")
    p.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--held", type=int, default=256, help="size of the monitor's held batch (test split)")
    p.add_argument("--metric-batch", type=int, default=256, help="samples the preconditioner's metric is built on")
    p.add_argument("--out", default="results/deepspeed")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args()


def build_model(kind: str, seed: int) -> tuple[torch.nn.Module, str]:
    if kind == "mlp":
        return zoo.mlp(64, (16,), 10, seed=seed), "flat"
    return zoo.transformer(seed=seed), "sequence"


class MicroBatches:
    """This rank's micro-batches: epoch e visits the shard in a permutation fixed by (seed, rank, e), so the i-th
    micro-batch is a function of i alone and a resumed run sees the same data as an uninterrupted one."""

    def __init__(self, shard: torch.Tensor, micro: int, seed: int, rank: int) -> None:
        if len(shard) < micro:
            raise SystemExit(f"rank {rank}'s shard has {len(shard)} samples, fewer than the micro-batch {micro}")
        self.shard, self.micro, self.seed, self.rank = shard, micro, seed, rank
        self.per_epoch = len(shard) // micro
        self._epoch, self._perm = -1, shard

    def __getitem__(self, i: int) -> torch.Tensor:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + epoch)
            self._epoch, self._perm = epoch, self.shard[torch.randperm(len(self.shard), generator=g)]
        return self._perm[j * self.micro:(j + 1) * self.micro]


def main() -> None:
    args = parse_args()
    config = raw_config(args.config)
    section = read_section(config)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model, shape = build_model(args.model, args.seed)
    X, y = zoo.digits(split="train", shape=shape)
    held = zoo.digits(split="test", shape=shape, n=args.held)
    optimizer = None
    if section.preconditioner is not None:
        metric_batch = (X[:args.metric_batch], y[:args.metric_batch])
        optimizer = DeepSpeedRiemannianSGD.from_config(model, metric_batch, section.preconditioner)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    monitor = CurvatureMonitor(engine, held) if section.monitor is not None else None

    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    losses: list[list[float]] = []
    if args.resume:
        _, state = load_checkpoint(engine, str(ckpt_dir), monitor=monitor, optimizer=optimizer)
        losses = list(state.get("losses", []))

    micro = engine.train_micro_batch_size_per_gpu()
    batches = MicroBatches(torch.tensor_split(torch.arange(X.shape[0]), world)[rank], micro, args.seed, rank)
    i = int(engine.global_steps) * engine.gradient_accumulation_steps()  # resumed runs continue the same order
    dtype = next(engine.module.parameters()).dtype
    t0 = time.perf_counter()
    while engine.global_steps < args.steps:
        idx = batches[i]
        i += 1
        loss = F.cross_entropy(engine(X[idx].to(engine.device, dtype)), y[idx].to(engine.device))
        before = engine.global_steps
        engine.backward(loss)
        engine.step()
        if engine.global_steps == before:  # inside a gradient accumulation
            continue
        step = int(engine.global_steps)
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        losses.append([step, float(mean_loss) / world])
        if monitor is not None:
            values = monitor.step()
            if values is not None and rank == 0:
                shown = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in values.items())
                print(f"step {step}: loss {losses[-1][1]:.4f}; {shown}", flush=True)
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(engine, str(ckpt_dir), tag=f"step{step}", monitor=monitor, optimizer=optimizer,
                            client_state_extra={"losses": losses})
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"model": args.model, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
               "steps": int(engine.global_steps), "seconds": time.perf_counter() - t0, "losses": losses,
               "history": monitor.state_dict()["history"] if monitor is not None else [],
               "config": config}
        (out / "history.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'history.json'}", flush=True)


if __name__ == "__main__":
    main()
