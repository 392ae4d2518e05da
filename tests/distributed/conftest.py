"""An embedded Ray instance shared by the tests of one module."""

from __future__ import annotations

import os

import pytest

from curvdist.distributed.cluster import ray_session


@pytest.fixture(scope="module")
def ray_module():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with ray_session(num_cpus=4) as ray:
        yield ray
