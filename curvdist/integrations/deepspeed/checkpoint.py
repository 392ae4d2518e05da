"""The monitor's history and the preconditioner's state in DeepSpeed checkpoints.

``save_checkpoint`` adds ``{"curvdist": {"monitor": ..., "preconditioner": ...}}`` to the ``client_state`` that
``engine.save_checkpoint`` stores with the model states, and ``load_checkpoint`` restores both after
``engine.load_checkpoint``, so that a resumed run continues the same curves: the monitor's history goes on from
the saved step, and the preconditioner keeps its step count, momentum and metric (``RiemannianSGD``'s own
``state_dict``: the diagonal or the Kronecker factors' eigendecompositions, not recomputed at the resumed
parameters).
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .monitor import CurvatureMonitor
from .optimizer import DeepSpeedRiemannianSGD

KEY = "curvdist"


def client_state(monitor: CurvatureMonitor | None = None,
                 optimizer: DeepSpeedRiemannianSGD | None = None) -> dict[str, Any]:
    """``{"curvdist": {...}}`` with the states of the given monitor and preconditioner."""
    state: dict[str, Any] = {}
    if monitor is not None:
        state["monitor"] = monitor.state_dict()
    if optimizer is not None:
        state["preconditioner"] = optimizer.curvdist_state_dict()
    return {KEY: state}


def restore(state: dict[str, Any], monitor: CurvatureMonitor | None = None,
            optimizer: DeepSpeedRiemannianSGD | None = None) -> None:
    """Restore a monitor and/or a preconditioner from a ``client_state`` that :func:`client_state` made."""
    saved = state.get(KEY)
    if saved is None:
        raise ConfigError(f"the checkpoint's client state has no '{KEY}' entry (saved without curvdist's "
                          f"save_checkpoint?)")
    for name, obj in (("monitor", monitor), ("preconditioner", optimizer)):
        if obj is None:
            continue
        if name not in saved:
            raise ConfigError(f"the checkpoint holds no {name} state")
        if name == "monitor":
            obj.load_state_dict(saved[name])
        else:
            obj.load_curvdist_state_dict(saved[name])


def save_checkpoint(engine: Any, save_dir: str, tag: Any = None, *, monitor: CurvatureMonitor | None = None,
                    optimizer: DeepSpeedRiemannianSGD | None = None, client_state_extra: dict[str, Any] | None = None,
                    **kwargs: Any) -> Any:
    """``engine.save_checkpoint`` with curvdist's state added to the client state (every rank must call it)."""
    extra = dict(client_state_extra or {})
    if KEY in extra:
        raise ConfigError(f"client_state_extra must not use the key '{KEY}'")
    extra.update(client_state(monitor, optimizer))
    return engine.save_checkpoint(save_dir, tag=tag, client_state=extra, **kwargs)


def load_checkpoint(engine: Any, load_dir: str, tag: Any = None, *, monitor: CurvatureMonitor | None = None,
                    optimizer: DeepSpeedRiemannianSGD | None = None, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``engine.load_checkpoint``, then the monitor's history and the preconditioner's state; returns DeepSpeed's
    ``(load_path, client_state)``."""
    path, state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if path is None:
        raise ConfigError(f"no DeepSpeed checkpoint found in {load_dir} (tag {tag!r})")
    restore(state or {}, monitor, optimizer)
    return path, state
