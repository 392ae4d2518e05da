"""A stage lost inside a product (``CURVDIST_FAULT``: its process exits mid-call) is recovered to the numbers of the
uninterrupted run. A module of its own: it runs in Ray sessions of its own (their workers must see the fault
setting), so no module fixture's pool outlives the shared session it stops."""

from __future__ import annotations

import pytest

from curvdist.distributed.cluster import ray_session
from curvdist.faults import FAULT_ENV

from .conftest import fresh_ray
from .test_stage_recovery import MICRO, _pool, _solve

#: stage 1 exits in the forward pass of the 5th product: 2 batches of 30 samples, each in MICRO micro-batches, and a
#: forward and a backward call per micro-batch and product
FAULT_CALL = 2 * (2 * MICRO) * 4 + 2


@pytest.mark.slow  # two fresh Ray sessions, four pools (about 70 s on 2 cores)
def test_stage_lost_inside_a_product_is_recovered_to_the_uninterrupted_numbers(monkeypatch):
    """CURVDIST_FAULT makes stage 1 exit inside the 5th product; with snapshots every product the product is run
    again, with snapshots every 3 products the 4th is first replayed on the restarted stage."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fresh_ray()  # its workers must see FAULT_ENV: sessions of its own
    clean = {}
    with ray_session(num_cpus=4):
        for k in (1, 3):
            pool = _pool(k)
            try:
                clean[k] = _solve(pool)
            finally:
                pool.shutdown()
    assert clean[1] == clean[3]
    monkeypatch.setenv(FAULT_ENV, f"worker=1,call={FAULT_CALL}")
    with ray_session(num_cpus=4):
        for k in (1, 3):
            pool = _pool(k)
            try:
                assert _solve(pool) == clean[k]
                assert pool.retries == 1 and pool.space.recoveries == 1
                assert pool.space.replayed_products == (1 if k == 3 else 0)
            finally:
                pool.shutdown()
