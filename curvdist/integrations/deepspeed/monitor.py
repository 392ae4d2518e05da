"""The curvature monitor: curvdist queries on a held batch every N global steps of a DeepSpeed run.

At a measurement every rank keeps its contiguous shard of the held batch. Under ZeRO stages 0-2 (and stage 3 with
``zero3: gather``) it loads a clean replica of the engine's module with the current parameters (gathered from
their partitions under ZeRO-3, cast to the monitor's dtype, in eval mode) and runs the queries on the
data-parallel problem whose products are ``all_reduce``-d over the engine's data-parallel group
(:mod:`.data_parallel`). Under ZeRO-3 by default it runs them on the engine's own partitions instead
(:mod:`.finite_difference`): finite-difference products through the engine's module, vectors as partitions, no
gathering beyond ZeRO-3's own layer-by-layer schedule. Every rank computes the same values; DeepSpeed's monitor (CSV,
TensorBoard, ... as configured in the DeepSpeed JSON) writes them from rank 0 as ``(name, value, global_step)``.

The training run is unaffected: the engine's module, its modes and gradients are never touched, and the global
random state (CPU and accelerator generators) is restored after each measurement. Solvers draw their probes
from their own seeded generators, so a measurement is a deterministic function of the parameters and the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import ConfigError, DataError
from ...queries.result import Result
from ...queries.session import Coordinates, run_query, scalars
from ...queries.specs import validate
from .config import MonitorSpec, monitor_spec
from .data_parallel import group_rank_and_size, shard, split_problem
from .engine import check_engine, data_parallel_group, torch_linear, zero_stage
from .finite_difference import PartitionedProblem, check_dtype
from .queries import check_partitioned, check_query, clean_name, default_name
from .replica import Replica


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the CPU generator and ``device``'s accelerator generator after the block."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
        return
    index = device.index if device.index is not None else 0
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield


class CurvatureMonitor:
    """Run curvdist queries on a held batch every ``spec.every`` global steps of ``engine`` and log them.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (anything else is a :class:`ConfigError` naming its type).
        held: the held batch ``(X, y)``, the same on every rank; each rank keeps its contiguous shard.
        spec: a :class:`MonitorSpec`, or a dict with its keys; ``None`` reads the ``curvdist.monitor`` section of
            the engine's DeepSpeed configuration (a missing section is a :class:`ConfigError`).
        **overrides: keys of the spec to override (``every=5``, ``queries=[...]``).

    ``step()`` after each ``engine.step()`` measures when the global step is a multiple of ``every``;
    ``measure()`` measures now. Both return ``{name: value}`` with names ``prefix/query name/quantity`` and
    append ``{"step", "values", "seconds"}`` to :attr:`history`, which :meth:`state_dict` saves.
    """

    def __init__(self, engine: Any, held: tuple[Tensor, Tensor], spec: MonitorSpec | dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        check_engine(engine)
        if spec is None:
            spec = monitor_spec(engine)
        elif isinstance(spec, dict):
            spec = _validate_monitor(spec)
        elif not isinstance(spec, MonitorSpec):
            raise ConfigError(f"spec must be a MonitorSpec, a dict or None, got {type(spec).__name__}")
        if overrides:
            raw = spec.model_dump(exclude={"names", "queries"})
            raw["queries"] = [_named(q, n) for q, n in zip(spec.queries, _names(spec))]
            spec = _validate_monitor({**raw, **overrides})
        self.engine, self.spec = engine, spec
        self.zero_stage = zero_stage(engine)
        self.group = data_parallel_group(engine)
        self.dtype = getattr(torch, spec.dtype)
        self.queries = [(q, q.curvature or spec.curvature, q.metric or spec.metric,
                         spec.seed if q.seed is None else q.seed) for q in spec.queries]
        #: ZeRO-3 curvature on the engine's partitions (finite differences), not on a gathered replica
        self.partitioned = self.zero_stage == 3 and spec.zero3 == "partitioned"
        if self.partitioned:
            check_dtype(next(engine.module.parameters()).ds_tensor.dtype)
        for q, c, m, _ in self.queries:
            check_query(q, m, self.zero_stage)
            if self.partitioned:
                check_partitioned(q, c, m)
        self.names = _unique([clean_name(n or default_name(q, c, m)) for (q, c, m, _), n in
                              zip(self.queries, _names(spec))])
        self.held = self._check_held(held)
        self.replica = None if self.partitioned else Replica(engine.module, self.dtype)
        self.history: list[dict[str, Any]] = []
        self.results: list[Result] = []

    # ------------------------------------------------------------------ measuring
    def step(self) -> dict[str, float] | None:
        """Measure if the engine's global step is a positive multiple of ``every`` not measured yet."""
        s = int(self.engine.global_steps)
        if s == 0 or s % self.spec.every or (self.history and self.history[-1]["step"] == s):
            return None
        return self.measure()

    def measure(self) -> dict[str, float]:
        """Run every query now, log the scalars through the engine's monitor and return them."""
        t0 = time.perf_counter()
        step = int(self.engine.global_steps)
        X, y = self.held
        values: dict[str, float] = {}
        results = []
        with preserved_rng(X.device), self._problem(X, y) as problem:
            coords = Coordinates("theta", problem, self.spec.seed)
            for (q, curvature, metric_spec, seed), name in zip(self.queries, self.names):
                r = run_query(q, coords, curvature, metric_spec, seed)
                results.append(r)
                for quantity, v in scalars(r).items():
                    values[f"{self.spec.prefix}/{name}/{quantity}"] = v
        self.results = results
        record = {"step": step, "values": values, "seconds": time.perf_counter() - t0}
        self.history.append(record)
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events([(name, v, step) for name, v in values.items()])
        return values

    @contextmanager
    def _problem(self, X: Tensor, y: Tensor) -> Iterator[Any]:
        """The measurement's problem: on the engine's ZeRO-3 partitions (this rank's shard of the batch), or
        on the replica loaded with the current parameters (data-parallel over the group)."""
        if self.partitioned:
            rank, size = group_rank_and_size(self.group)
            Xr, yr = shard(X, y, rank, size)
            yield PartitionedProblem(self.engine, self.spec.loss, Xr, yr, self.group, self.spec.params,
                                     self.spec.reduction, self.spec.batch_size, self.spec.fd_step, self.spec.fd_tol)
            return
        assert self.replica is not None
        with torch_linear(), self.replica.loaded(self.engine.module) as model:
            yield split_problem(model, self.spec.loss, X, y, self.group, self.spec.params, self.spec.reduction,
                                self.spec.batch_size)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged scalar over the history."""
        pts = [(h["step"], h["values"][name]) for h in self.history if name in h["values"]]
        return [s for s, _ in pts], [v for _, v in pts]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The history (plain Python values), for ``engine.save_checkpoint(client_state=...)``."""
        return {"history": [dict(h, values=dict(h["values"])) for h in self.history], "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict` (the queries must be named the same)."""
        if list(state.get("names", [])) != self.names:
            raise ConfigError(f"the checkpointed monitor ran the queries {state.get('names')}, this one runs "
                              f"{self.names}")
        self.history = [dict(h, values=dict(h["values"])) for h in state["history"]]

    # ------------------------------------------------------------------ helpers
    def _check_held(self, held: Any) -> tuple[Tensor, Tensor]:
        """The held batch on the engine's device; refuse one that differs between ranks (a checksum per rank)."""
        if not (isinstance(held, (tuple, list)) and len(held) == 2 and all(isinstance(t, Tensor) for t in held)):
            raise DataError("held must be an (X, y) pair of tensors, the same on every rank")
        X, y = held
        if X.shape[0] != y.shape[0]:
            raise DataError(f"held: X has {X.shape[0]} samples but y has {y.shape[0]}")
        device = self.engine.device if isinstance(self.engine.device, torch.device) else torch.device(
            self.engine.device)
        X, y = X.to(device), y.to(device)
        fingerprint = torch.tensor([float(X.shape[0]), float(X.double().sum()), float(y.double().sum())],
                                   dtype=torch.float64, device=device)
        lo, hi = fingerprint.clone(), fingerprint.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            raise DataError("the held batch differs between ranks: pass the same (X, y) on every rank (each rank "
                            "keeps its own shard of it)")
        world = dist.get_world_size(self.group)
        if X.shape[0] < world:
            raise DataError(f"the held batch has {X.shape[0]} samples, fewer than the {world} data-parallel ranks")
        return X, y


def _validate_monitor(raw: dict[str, Any]) -> MonitorSpec:
    return validate(MonitorSpec, raw, "monitor")


def _names(spec: MonitorSpec) -> list[str | None]:
    return list(spec.names) + [None] * (len(spec.queries) - len(spec.names))


def _named(q: Any, name: str | None) -> dict[str, Any]:
    d = q.model_dump()
    if name is not None:
        d["name"] = name
    return d


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
