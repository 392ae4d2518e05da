"""An embedded Ray instance shared by the distributed tests: started by the first module that asks for it (a start
costs about 5 s on 2 cores), shut down after the last one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from curvdist.distributed.cluster import ray_session


@pytest.fixture(scope="session")
def _ray_sessions() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture(scope="module")
def ray_module(request: pytest.FixtureRequest, _ray_sessions: ExitStack) -> Iterator[Any]:
    """The shared instance; started again when a test shut it down (a test that needs its own session, with
    :func:`fresh_ray`), and shut down after the last module that uses it, so the rest of the suite runs without
    it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        _ray_sessions.enter_context(ray_session(num_cpus=8))  # logical: room for a shared pool beside a test's
    yield ray
    items = request.session.items
    last = max((i for i, item in enumerate(items) if item.module is request.module), default=len(items))
    if not any("ray_module" in getattr(item, "fixturenames", ()) for item in items[last + 1:]):
        _ray_sessions.close()


def fresh_ray() -> None:
    """Shut the shared instance down (a test that starts its own session, with other worker settings)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
