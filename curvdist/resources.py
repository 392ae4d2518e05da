"""Memory as a result: the peak resident memory of a process during a query, and what each process holds.

Linux keeps a process's resident high-water mark (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident size, so the peak *during* a query is measured by a
reset before and a read after. Where that is not possible (another OS, a restricted ``/proc``) the lifetime peak
(``getrusage``) is reported and marked as such. On an accelerator the device's own peak allocation is added.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import torch


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(device: torch.device | str | None = None) -> bool:
    """Start a new peak-memory window for this process (and ``device``'s allocator); False if the resident
    high-water mark cannot be reset here (the lifetime peak is reported instead)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The resident high-water mark of this process in MiB (since the last :func:`reset_peak` on Linux)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: getrusage reports bytes on macOS, KiB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = peak / 1024 if sys.platform == "darwin" else peak
    return kb / 1024


def rss_mb() -> float:
    """The current resident size of this process in MiB."""
    kb = _status_kb("VmRSS")
    return (kb / 1024) if kb is not None else peak_rss_mb()


def memory_record(role: str, parameters: int, windowed: bool, device: torch.device | str | None = None,
                  **extra: Any) -> dict[str, Any]:
    """One process's line of a result's ``info["memory"]``: its role (``local``, ``stage 1``, ``worker 0``, …),
    the parameters it holds, its peak resident memory (MiB) in the window and where the window started."""
    rec: dict[str, Any] = {"role": role, "pid": os.getpid(), "parameters": int(parameters),
                           "peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(rss_mb(), 1),
                           "window": "query" if windowed else "process lifetime"}
    if device is not None and torch.device(device).type == "cuda":
        rec["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rec.update(extra)
    return rec


def release_free_memory() -> None:
    """Return the allocator's free memory to the system (glibc ``malloc_trim``; a no-op elsewhere). Products of
    large models free hundreds of MB of temporaries; without this the resident size keeps them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes() -> int:
    """Memory this process can still allocate: the system's available memory (``psutil``; the physical memory if
    psutil is missing)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_allocation(nbytes: float, what: str, knob: str) -> None:
    """Raise :class:`~curvdist.errors.MemoryBudgetError` when ``nbytes`` exceed the available memory, naming the
    size, ``what`` it is for and the ``knob`` that avoids it — before the allocator fails somewhere inside torch."""
    free = available_bytes()
    if nbytes > free:
        from .errors import MemoryBudgetError

        raise MemoryBudgetError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                                f"available; {knob}")
