"""Connecting to Ray: an embedded local instance or an existing cluster, started and stopped cleanly.

Without an address an embedded Ray starts in this process: dashboard off, its node bound to 127.0.0.1 (Ray still
listens on all interfaces for some internal ports — see the README), and ``RAY_AUTH_MODE`` set explicitly so a
token written by an earlier ``ray.init()`` cannot make later job submission fail (STACK.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import CurvdistError
from ..faults import FAULT_ENV


class ClusterError(CurvdistError, RuntimeError):
    """Ray could not be started or reached."""


class StageRestarted(ClusterError):
    """A call reached a pipeline stage that Ray restarted and the coordinator has not yet recovered (its shards
    are those of the last snapshot): the coordinator recovers it and runs the call again."""


def is_lost(ray: Any, error: BaseException) -> bool:
    """Whether ``error`` (from ``ray.get``) means an actor was lost: it died, or a call reached its new life
    before the coordinator recovered it."""
    if isinstance(error, (ray.exceptions.RayActorError, StageRestarted)):
        return True
    return isinstance(getattr(error, "cause", None), StageRestarted)


def resources_per_worker() -> dict[str, float]:
    """One GPU per actor when the cluster has GPUs (a CPU-only head with GPU workers included), else one CPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return {"num_gpus": 1.0} if gpus > 0 else {"num_cpus": 1.0}


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """``ray.init`` for the duration of the block; shuts down only what it started.

    ``num_cpus`` is the embedded instance's logical CPU count: at least the number of actors to place (each asks
    for one CPU), which may exceed the physical cores."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # forwarded to every worker process (fault injection for tests, auth mode)
    env = {k: os.environ[k] for k in (FAULT_ENV, "RAY_AUTH_MODE") if k in os.environ}
    started = False
    if not address and os.environ.get("RAY_ADDRESS"):  # inside a Ray job or a launcher: join that cluster
        address = os.environ["RAY_ADDRESS"]
    if not ray.is_initialized():
        if address and address != "auto" and not address.startswith("http"):
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": env})
        except Exception as e:  # connection refused, bad address, ...
            where = address or "an embedded local instance"
            raise ClusterError(f"cannot start or reach Ray at {where}: {type(e).__name__}: {e}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


SCHEDULE_TIMEOUT = 300.0


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (ray.init retries an unreachable GCS for minutes): a TCP connect to host:port first."""
    import socket

    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not of the form host:port (or ray://host:port, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"cannot start or reach Ray at {address}: {e}") from None


def wait_scheduled(ray: Any, actors: list[Any], what: str, timeout: float = SCHEDULE_TIMEOUT) -> None:
    """Wait until every actor has been created; a clear error instead of waiting forever for resources.

    A worker whose construction fails (a model that does not build, ...) raises its own error here."""
    refs = [a.__ray_ready__.remote() for a in actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        res = resources_per_worker()
        raise ClusterError(
            f"{len(pending)} of {len(actors)} {what} could not be scheduled within {timeout:.0f} s: each needs "
            f"{res} and the cluster has {ray.available_resources()} available"
        )
    for r in ready:
        try:
            ray.get(r)
        except ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or getattr(e, "error_msg", None) or e
            raise ClusterError(f"a {what.rstrip('s')} failed to start: {cause}") from None


#: how long a coordinator waits for Ray to restart a lost actor
RESTART_DEADLINE = 120.0


def wait_alive(ray: Any, actor: Any, what: str, deadline: float = RESTART_DEADLINE) -> None:
    """Block until Ray has restarted ``actor`` (it rebuilds itself from its spec in ``__init__``); a
    :class:`ClusterError` naming ``what`` after ``deadline`` seconds."""
    t0 = time.monotonic()
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            if time.monotonic() - t0 > deadline:
                raise ClusterError(f"{what} did not come back within {deadline:.0f} s: {e}") from None
            time.sleep(0.5)
