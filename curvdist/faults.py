"""The fault-injection switch, the only test hook in production code (documented in the README).

* ``CURVDIST_FAULT="worker=<i>,call=<k>"``: Ray actor i (a data-mode worker or a pipeline stage) exits hard at its
  k-th statistic/product call, in its first life only — Ray restarts it, it rebuilds itself from its spec, and
  the coordinator retries the call, so a run must give the numbers of an uninterrupted one.
* ``CURVDIST_STOP_AT_STEP=N``: the process exits (code 75) right after saving a Lanczos checkpoint at or past step
  N, to test ``curvdist run --resume``.
"""

from __future__ import annotations

import os

FAULT_ENV = "CURVDIST_FAULT"
STOP_ENV = "CURVDIST_STOP_AT_STEP"


def fault_plan() -> tuple[int, int] | None:
    """(actor index, call number) of the injected fault, or None."""
    text = os.environ.get(FAULT_ENV, "")
    if not text:
        return None
    kv = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return int(kv.get("worker", -1)), int(kv.get("call", kv.get("matvec", -1)))


def maybe_fail(index: int, call: int, restarted: bool) -> None:
    """Exit hard when actor ``index`` (not yet restarted) reaches its planned ``call``."""
    plan = fault_plan()
    if plan and plan[0] == index and plan[1] == call and not restarted:
        os._exit(1)


def maybe_stop(step: int) -> None:
    """Exit (code 75) when a checkpoint at ``step`` reached the planned stop."""
    stop = os.environ.get(STOP_ENV)
    if stop and step >= int(stop):
        os._exit(75)
