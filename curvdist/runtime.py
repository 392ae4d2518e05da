"""Process-level runtime settings: how many CPU threads a run uses, and where the user's code is imported from.

Threads
-------
``choose_threads(dim, requested)`` decides torch's intra-op thread count; ``set_threads`` / ``threads`` apply it.

The rule for ``requested="auto"`` (the default):

1. ``CURVDIST_THREADS`` in the environment, when set, overrides ``requested`` (an integer ≥ 1 or ``auto``).
2. An explicit integer is honoured as given.
3. Otherwise the count is the number of *free* CPUs, capped by the problem size:

   - usable CPUs = the process's CPU affinity (``os.sched_getaffinity``), further capped by a cgroup CPU quota
     (``cpu.max`` / ``cpu.cfs_quota_us``) when there is one;
   - free CPUs = the idle CPU time of those CPUs sampled from ``/proc/stat`` over ``SAMPLE_SECONDS`` (0.15 s),
     plus whatever this process itself used during the sample (so only *other* processes count as load). Where
     ``/proc/stat`` is missing (macOS), the 1-minute load average minus this process's own average CPU use is
     used instead; where neither exists, all usable CPUs count as free;
   - threads = ⌊free + 0.3⌋ (a CPU counts as free when it is at least 70 % idle), clamped to [1, usable CPUs];
   - problems with fewer than ``SMALL_DIM`` (10⁴) parameters get 1 thread (no sampling is done), problems with
     fewer than ``MEDIUM_DIM`` (10⁵) parameters at most 2.

Why (2-CPU VM, torch 2.13 CPU, OpenMP backend, float64):

- Oversubscription is very expensive: torch's OpenMP workers spin and wait for each other at every parallel
  region, so with one CPU-bound co-tenant on 2 CPUs a 2-thread run is much slower than a 1-thread run. One
  Hessian-vector product (``jvp(grad(f))``, 3-layer tanh MLP, 1,437 samples) with a ``while True: pass``
  co-tenant: 1 thread vs 2 threads 5.8 vs 30.5 ms (dim 1.5·10³), 12.1 vs 40.0 ms (6·10³), 55 vs 96 ms
  (2.6·10⁴), 253 vs 722 ms (3·10⁵) — 2 threads lose by 1.7–5×, at every size.
- Without a co-tenant, 2 threads gain little on small problems and clearly on larger ones: the same product,
  2 threads' speedup over 1 thread: 1.07–1.15× at dim 1.5·10³ and 6·10³, 1.44× at 9·10³, 1.62× at 2.6·10⁴,
  1.85× at 3·10⁵, 2.25× at 2.5·10⁶. The small-problem gain is smaller than the noise of a busy machine and the
  risk above, hence 1 thread below 10⁴ parameters. (Only 2 CPUs were available: the cap of 2 below 10⁵ is a
  conservative guess, not a measurement.)
- The quickstart (``configs/quickstart.yaml``, dim 1,210, ``curvdist run -q``) end to end, wall seconds, runs
  with other load on the machine discarded; co-tenant = ``python3 -c "while True: pass"``:

  ==============================  =============================================
  solo, 1 thread                  16.1, 16.3, 17.1, 17.7
  solo, 2 threads (torch default) 14.5, 14.8, 15.8, 16.0
  solo, auto (dim unknown → 2)    13.7, 14.2, 15.3, 16.4
  co-tenant, 2 threads            32.7, 34.6, 35.0 (2.1-2.4× solo)
  co-tenant, 1 thread             15.2, 16.2, 16.4, 16.7
  co-tenant, auto (sampled → 1)   15.9, 15.9, 16.3 (≈ 1.05× solo)
  co-tenant, auto with dim → 1    16.7
  ==============================  =============================================

- numpy/scipy's OpenBLAS pool is not governed by ``torch.set_num_threads`` and matters for dense LAPACK work:
  ``scipy.linalg.eigh`` of an 800×800 matrix with a co-tenant takes 32 ms with 1 BLAS thread, 80 ms with 2
  (``torch.linalg.eigvalsh``: 58 vs 143 ms with 1 vs 2 torch threads). Setting ``torch.set_num_interop_threads(1)``
  (16.1, 17.2 s) or the BLAS pool to 1 (14.5, 15.8, 18.4 s) on top of 1 torch thread made no measurable
  difference to the quickstart with a co-tenant (1 thread alone: 15.2-16.7 s).

The inter-op pool (``torch.get_num_interop_threads``) is left alone: eager torch code does not use it (only
TorchScript ``fork`` and a few ops do), and ``torch.set_num_interop_threads`` may be called at most once per
process, before any parallel work. ``torch.set_num_threads`` sets OpenMP and MKL (torch's LAPACK/BLAS); numpy and
scipy bring their own OpenBLAS pool, which ``threads``/``set_threads`` also limit when ``threadpoolctl`` (a
scikit-learn dependency) is importable.

Import paths
------------
``user_import_paths(config_path)`` puts the current working directory and the config file's directory at the
front of ``sys.path`` (once, without duplicates), so a config's ``model.factory: mymodels:net`` finds
``mymodels.py`` next to the config or in the working directory, as ``python -m`` would for the latter.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["ENV_VAR", "MEDIUM_DIM", "SMALL_DIM", "ThreadChoice", "available_cpus", "choose_threads", "free_cpus",
           "remove_import_paths", "sample_idle_cpus", "set_threads", "thread_choice", "threads",
           "user_import_paths"]

ENV_VAR = "CURVDIST_THREADS"
SMALL_DIM = 10_000
MEDIUM_DIM = 100_000
SAMPLE_SECONDS = 0.15
FREE_SLACK = 0.3  # a CPU counts as free when at least 1 - FREE_SLACK of it is idle

_T0 = time.monotonic()
_CPU0 = time.process_time()


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and how it was chosen (for reports)."""

    threads: int
    source: str  # "explicit" | "env" | "auto"
    requested: int | str
    cpus: int | None = None  # usable CPUs (auto only)
    free_cpus: float | None = None  # measured free CPUs (auto only, None when not sampled)
    dim: int | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "source": self.source, "requested": self.requested, "cpus": self.cpus,
                "free_cpus": None if self.free_cpus is None else round(self.free_cpus, 2), "dim": self.dim,
                "reason": self.reason}


# ---------------------------------------------------------------------------------------------------------------
# Machine


def _affinity() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = float(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = float(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity set (else ``os.cpu_count()``), capped by a cgroup CPU quota."""
    aff = _affinity()
    n = len(aff) if aff else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _read_proc_stat(cpus: list[int] | None) -> dict[str, tuple[int, int]] | None:
    """{cpu line name: (idle jiffies, total jiffies)} for the given CPUs (all CPUs' aggregate line when None)."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    want = {f"cpu{i}" for i in cpus} if cpus else {"cpu"}
    out: dict[str, tuple[int, int]] = {}
    for line in lines:
        parts = line.split()
        if not parts or parts[0] not in want:
            continue
        vals = [int(v) for v in parts[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in user/nice.
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        out[parts[0]] = (idle, total)
    return out or None


def sample_idle_cpus(interval: float = SAMPLE_SECONDS) -> float | None:
    """Idle CPUs (a float, e.g. 1.02 of 2) among this process's CPUs not used by *other* processes, measured from
    ``/proc/stat`` over ``interval`` seconds; None where ``/proc/stat`` is unavailable.

    This process's own CPU time during the interval (its other threads) is counted as idle, so a process that
    calls this while busy itself still sees only its co-tenants' load. Steal time counts as busy.
    """
    cpus = _affinity()
    a = _read_proc_stat(cpus)
    if a is None:
        return None
    own0, t0 = time.process_time(), time.monotonic()
    time.sleep(interval)
    b = _read_proc_stat(cpus)
    own, wall = time.process_time() - own0, time.monotonic() - t0
    if b is None:
        return None
    idle = total = 0
    for k, (i0, tot0) in a.items():
        if k in b:
            idle += b[k][0] - i0
            total += b[k][1] - tot0
    if total <= 0:
        return None
    n = len(a) if cpus else (os.cpu_count() or 1)
    frac_idle = idle / total
    own_cpus = own / wall if wall > 0 else 0.0
    return min(float(n), max(0.0, frac_idle * n + own_cpus))


def _load_free_cpus(n: int) -> float | None:
    """Fallback: usable CPUs minus the 1-minute load average of other processes (our own average CPU use since
    this module was imported, over at most the last minute, is subtracted from the load)."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    wall = time.monotonic() - _T0
    own = (time.process_time() - _CPU0) / wall if wall > 1.0 else 0.0
    others = max(0.0, load1 - min(own, load1))
    return max(0.0, n - others)


def free_cpus(interval: float = SAMPLE_SECONDS) -> float:
    """CPUs not used by other processes, at most ``available_cpus()``: sampled idle time where ``/proc/stat``
    exists, else from the load average, else all usable CPUs."""
    n = available_cpus()
    idle = sample_idle_cpus(interval)
    if idle is None:
        idle = _load_free_cpus(n)
    if idle is None:
        return float(n)
    return min(float(n), idle)


# ---------------------------------------------------------------------------------------------------------------
# Thread choice


def _parse_request(value: Any, where: str) -> int | str:
    """An int ≥ 1 or the string "auto" (None means auto); anything else is a ConfigError naming ``where``."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected 'auto' or an integer >= 1, got {value!r}")
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("auto", ""):
            return "auto"
        try:
            value = int(s)
        except ValueError:
            raise ConfigError(f"{where}: expected 'auto' or an integer >= 1, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected 'auto' or an integer >= 1, got {value!r}")
    if value < 1:
        raise ConfigError(f"{where}: the thread count must be >= 1, got {value}")
    return value


def thread_choice(dim: int | None = None, requested: int | str | None = "auto") -> ThreadChoice:
    """Like ``choose_threads`` but returns the count with how it was chosen (a ``ThreadChoice``)."""
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
        raise ConfigError(f"threads: dim must be a non-negative integer or None, got {dim!r}")
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip() != "":
        req = _parse_request(env, f"environment variable {ENV_VAR}")
        source = "env"
    else:
        req = _parse_request(requested, "threads")
        source = "explicit"
    if req != "auto":
        assert isinstance(req, int)
        return ThreadChoice(req, source, req, dim=dim, reason=f"{source} request")
    n = available_cpus()
    if dim is not None and dim < SMALL_DIM:
        return ThreadChoice(1, "auto", "auto", cpus=n, dim=dim,
                            reason=f"small problem (dim {dim} < {SMALL_DIM}): 1 thread")
    free = free_cpus()
    k = max(1, min(n, int(free + FREE_SLACK)))
    reason = f"{free:.2f} of {n} CPUs free"
    if dim is not None and dim < MEDIUM_DIM and k > 2:
        k = 2
        reason += f"; dim {dim} < {MEDIUM_DIM}: at most 2 threads"
    return ThreadChoice(k, "auto", "auto", cpus=n, free_cpus=free, dim=dim, reason=reason)


def choose_threads(dim: int | None = None, requested: int | str | None = "auto") -> int:
    """The intra-op thread count for a run on a problem with ``dim`` parameters (None: unknown).

    ``requested``: an integer ≥ 1 (honoured as given), or ``"auto"``/None: the free CPUs (usable CPUs minus the
    load of other processes, sampled from ``/proc/stat`` over 0.15 s), capped at 1 for ``dim < 10⁴`` and at 2 for
    ``dim < 10⁵``. The environment variable ``CURVDIST_THREADS`` (an integer or ``auto``), when set, overrides
    ``requested``. Bad values raise ``ConfigError``. See the module docstring for the measurements behind the rule.
    """
    return thread_choice(dim, requested).threads


def _limit_blas(n: int) -> None:
    """Limit numpy/scipy's own BLAS pool (OpenBLAS/MKL loaded by numpy) to ``n`` threads, where threadpoolctl
    exists; torch's own pools are set by ``torch.set_num_threads``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    try:
        threadpool_limits(n, user_api="blas")
    except Exception:  # noqa: BLE001, S110 - a BLAS library threadpoolctl cannot drive must not stop a run
        pass


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    try:
        counts = [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]
    except Exception:  # noqa: BLE001 - as in _limit_blas
        return None
    return max(counts) if counts else None


def set_threads(requested: int | str | None = "auto", dim: int | None = None) -> ThreadChoice:
    """Choose (:func:`thread_choice`) and apply the intra-op thread count: ``torch.set_num_threads`` (OpenMP and
    MKL) and numpy/scipy's BLAS pool where threadpoolctl is available. Returns the choice (for the report)."""
    import torch

    choice = thread_choice(dim, requested)
    torch.set_num_threads(choice.threads)
    _limit_blas(choice.threads)
    return choice


@contextmanager
def threads(requested: int | str | None = "auto", dim: int | None = None) -> Iterator[ThreadChoice]:
    """``with threads(n) as choice:`` — run the block with ``set_threads(n, dim)`` applied and restore the previous
    torch (and BLAS) thread counts on exit, also after an error."""
    import torch

    prev, prev_blas = torch.get_num_threads(), _blas_threads()
    try:
        yield set_threads(requested, dim)
    finally:
        torch.set_num_threads(prev)
        if prev_blas is not None:
            _limit_blas(prev_blas)


# ---------------------------------------------------------------------------------------------------------------
# Import paths


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def user_import_paths(config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Put the current working directory and the directory of ``config_path`` at the front of ``sys.path`` (in that
    order: the working directory first, as ``python -m`` does), so that a config's ``module:callable`` factories
    import user modules sitting there. A directory already on ``sys.path`` (also as ``''``, which means the working
    directory) is not added again; calling this twice adds nothing the second time. Returns the directories added.
    """
    cwd = os.getcwd()
    wanted = [cwd]
    if config_path is not None:
        d = os.path.dirname(os.path.abspath(os.fspath(config_path)))
        if os.path.isdir(d):
            wanted.append(d)
    added: list[str] = []
    for d in wanted:
        present = any(_same_path(p or cwd, d) for p in sys.path if isinstance(p, str) and (p == "" or
                                                                                            os.path.isdir(p)))
        if not present and not any(_same_path(a, d) for a in added):
            added.append(d)
    sys.path[:0] = added
    return added


def remove_import_paths(added: list[str]) -> None:
    """Undo ``user_import_paths``: remove the directories it returned from ``sys.path`` (one entry each, if still
    there), so that a long-lived process (tests, a notebook calling the CLI's ``main``) keeps its ``sys.path``."""
    for d in added:
        try:
            sys.path.remove(d)
        except ValueError:
            pass
