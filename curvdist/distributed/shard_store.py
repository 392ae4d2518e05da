"""Pipeline mode, stage side: the vector shards a stage holds, their kernels, and their snapshots on disk.

A stage holds its coordinates of every live vector (keyed by integer ids the coordinator hands out) and of every
Lanczos basis (a :class:`~curvdist.solvers.space.Basis`: preallocated rows, products with the whole basis as
matrix-vector products — the local kernels on the stage's slice). The coordinator's
:class:`~curvdist.distributed.sharded_space.ShardedSpace` calls these methods; the fused ones
(:meth:`ShardStore.basis_project`, :meth:`~ShardStore.basis_subtract_dots`, :meth:`~ShardStore.basis_subtract_norm2`)
do a Lanczos step's vector work in three calls that return scalars only.

Snapshots: at a snapshot (the start of every K-th product) a stage writes what changed since the previous one —
new or rewritten vectors, new basis rows — and then the snapshot's *manifest*: its number (the *epoch*) and the
file of every vector, marker and basis row it holds. The writes run on a thread of their own while the product's
passes compute; the stage waits for them in the product's last call (:meth:`ShardStore._settle_writes`), so the
snapshot is on disk when the product's result is, and the coordinator drops its log only then. A snapshot never
overwrites a file of the previous one (a rewritten vector gets a new file name) and deletes the files the previous
one alone held only after its manifest is written: a stage that dies while writing comes back with the previous
snapshot whole, and the coordinator replays the operations logged since that one on it. A vector
the coordinator declared dead (:meth:`ShardStore.discard`: its value will be written before it is read again, like
a Lanczos run's work vector once it is in the basis) is written as a marker only, and a restarted stage holds NaN
there: a read before a write would show, not pass silently.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ProblemError, SolverError, first_line
from ..solvers.file_blocks import file_block
from ..solvers.space import Basis, random_segments
from . import wire
from .cluster import ClusterError, StageRestarted

#: entries per float64 chunk of a dot product of lower-precision shards
DOT_CHUNK = 1 << 22

#: a basis as the coordinator names it: (basis id, number of rows used, precise dots)
BasisRef = tuple[int, int, bool]


def dot64(x: Tensor, y: Tensor) -> float:
    """xᵀy accumulated in float64, without a float64 copy of either: ``DOT_CHUNK`` entries at a time through two
    float64 buffers made once (a fresh pair a chunk costs 4x the time on the CPU, in page faults)."""
    if x.dtype == torch.float64 and y.dtype == torch.float64:
        return float(torch.dot(x, y))
    n = x.numel()
    bx, by = (torch.empty(min(DOT_CHUNK, n), dtype=torch.float64, device=x.device) for _ in range(2))
    total = 0.0
    for i in range(0, n, DOT_CHUNK):
        m = min(DOT_CHUNK, n - i)
        bx[:m].copy_(x[i:i + m])
        by[:m].copy_(y[i:i + m])
        total += float(torch.dot(bx[:m], by[:m]))
    return total


def _save(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (a crash leaves no half-written file): a vector's data as a ``.npy``
    file (its bytes as they are: no copy and no checksum, 2-4x faster than ``torch.save`` of a row), anything else
    through ``torch.save``."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, wire.as_array(obj))  # a basis row: its view of the block, no copy
    else:
        torch.save(obj, tmp)
    tmp.replace(path)


#: actor methods a restarted stage answers before it is recovered (they report on it or recover it)
UNGUARDED = frozenset({"life", "resume", "info", "meters", "reset_meters", "param_version", "build"})


class _Vectors(dict):  # type: ignore[type-arg]
    """A stage's vectors by id; reading one that is not here — freed, or discarded and not written since — raises
    a :class:`~curvdist.errors.SolverError` naming it."""

    def __missing__(self, vid: int) -> Tensor:
        raise SolverError(f"vector {vid} has no value on this stage: it was freed, or discarded (its value declared "
                          f"dead) and read before it was written again")


def guard_restarts(cls: type) -> type:
    """Make every public method of an actor class raise :class:`StageRestarted` in a restarted life until the
    coordinator calls ``resume`` (calls queued before it noticed the loss must not compute with the last snapshot's
    shards, which may be stale: a prefix view of a basis missing its newer rows would silently be shorter)."""
    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.awaiting_recovery:
                raise StageRestarted(f"{name} reached a restarted stage before its recovery")
            return fn(self, *args, **kwargs)

        return guarded

    for name in dir(cls):
        fn = getattr(cls, name)
        if not name.startswith("_") and name not in UNGUARDED and callable(fn):
            setattr(cls, name, wrap(name, fn))
    return cls


class ShardStore:
    """Vector and basis shards of one stage (a mixin of :class:`~curvdist.distributed.stages.StageWorker`, which
    sets ``dim``, ``dtype``, ``device``, ``total`` and ``segments`` when it builds)."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    total: int
    segments: list[tuple[int, int]]

    def _open_store(self, snapshots: Path | None, basis_dir: Path | None = None) -> None:
        """``basis_dir``: keep basis rows in memory-mapped files there
        (:func:`~curvdist.solvers.file_blocks.file_block`; CPU stages only), out of the working memory."""
        self._basis_allocate = None
        if basis_dir is not None:
            if self.device.type != "cpu":
                raise ProblemError(f"basis_on_disk maps basis rows from files on the CPU; this stage runs on "
                                   f"{self.device}, where the rows stay in device memory (turn basis_on_disk off)")
            basis_dir.mkdir(parents=True, exist_ok=True)
            self._basis_allocate = file_block(basis_dir, self.dtype)
        self.vectors: dict[int, Tensor] = _Vectors()
        self.bases: dict[int, Basis] = {}
        self.row_of: dict[int, tuple[int, int]] = {}  # vectors that are views of basis rows: id → (basis, row)
        self.snapshots = snapshots
        self.persisted: set[int] = set()  # vectors whose current value (or dead marker) is in the manifest
        self.persisted_rows: dict[int, int] = {}  # basis id → rows in the manifest
        self.manifest: dict[str, str] = {}  # the last snapshot: key (v12, r12, d12, B3, b3_0) → its file
        self.dead: set[int] = set()  # vectors whose value is not needed (discard): snapshots write a marker
        self.epoch = -1  # the last snapshot written (or loaded)
        self._writer: ThreadPoolExecutor | None = None  # the snapshot writes' thread, made at the first one
        self._writing: Future[None] | None = None  # the writes of the last snapshot, until waited for
        self.snapshot_wait_s = 0.0  # time the stage waited for its snapshot writes (in the product's last call)
        self._write_error: str | None = None  # a snapshot write failed: no later snapshot is taken
        self.token = uuid.uuid4().hex  # this life of the actor
        self.awaiting_recovery = False  # a restarted life, until the coordinator replayed the log on it
        if snapshots is not None:
            snapshots.mkdir(parents=True, exist_ok=True)

    def life(self) -> tuple[str, int]:
        """(this life's token, the snapshot it holds): a new token means Ray restarted the actor."""
        return self.token, self.epoch

    def resume(self) -> None:
        """The coordinator recovers this life: the calls it sends from now on replay the log, then go on."""
        self.awaiting_recovery = False

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, epoch: int, background: bool = False) -> None:
        """Snapshot ``epoch``: write what changed since the last one, then the manifest, then delete the files only
        the last one held. With ``background`` the writes run on the store's writer thread and this returns at once
        (the caller waits with :meth:`_settle_writes` before the state they hold changes in place); the tensors
        written are the ones held now: later calls replace vectors with new tensors, and the few that write into a
        held tensor (:meth:`_out`, an in-place :meth:`basis_subtract`, :meth:`basis_rotate`) wait first."""
        if self.snapshots is None:
            return
        self._settle_writes()
        if self._write_error is not None:
            raise ClusterError(self._write_error)
        old, new = self.manifest, {}
        taken = set(old.values())
        writes: list[tuple[str, Callable[[], Any]]] = []

        def keep_or_write(key: str, current: bool, value: Callable[[], Any], ext: str = "pt") -> None:
            if current and key in old:
                new[key] = old[key]
                return
            name = f"{key}.{ext}" if f"{key}.{ext}" not in taken else f"{key}.{epoch}.{ext}"  # not the last one's
            new[key] = name
            writes.append((name, value))

        for vid in sorted(self.dead):
            keep_or_write(f"d{vid}", vid in self.persisted, lambda: torch.tensor(0))
        for vid, t in self.vectors.items():
            if vid in self.dead:  # a restarted stage's NaN in place of a dead value: its marker is written
                continue
            if vid in self.row_of:
                keep_or_write(f"r{vid}", vid in self.persisted, lambda rc=self.row_of[vid]: torch.tensor(rc))
            else:
                keep_or_write(f"v{vid}", vid in self.persisted, lambda t=t: t, "npy")
        self.persisted = set(self.dead) | set(self.vectors)
        for bid, basis in self.bases.items():
            keep_or_write(f"B{bid}", bid in self.persisted_rows, lambda c=basis.capacity or 0: torch.tensor([c]))
            done = self.persisted_rows.get(bid, 0)
            for j in range(len(basis)):
                keep_or_write(f"b{bid}_{j}", j < done, lambda r=basis[j]: r, "npy")
            self.persisted_rows[bid] = len(basis)
        self.persisted_rows = {bid: n for bid, n in self.persisted_rows.items() if bid in self.bases}
        obsolete = taken - set(new.values())
        self.manifest, self.epoch = new, epoch
        job = functools.partial(self._write_snapshot, self.snapshots, epoch, writes, dict(new), obsolete)
        if not background:
            job()
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvdist-snapshot")
        self._writing = self._writer.submit(job)

    @staticmethod
    def _write_snapshot(d: Path, epoch: int, writes: list[tuple[str, Callable[[], Any]]],
                        manifest: dict[str, str], obsolete: set[str]) -> None:
        for name, value in writes:
            _save(d / name, value())
        _save(d / "epoch.pt", {"epoch": epoch, "files": manifest})  # the snapshot exists from here on
        for name in obsolete:
            (d / name).unlink(missing_ok=True)

    def _settle_writes(self) -> None:
        """Wait for the last snapshot's writes (if they run on the writer thread); a write that failed is raised as
        a :class:`~curvdist.distributed.cluster.ClusterError` naming the directory."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        t0 = time.perf_counter()
        try:
            writing.result()
        except Exception as e:  # noqa: BLE001 - whatever stopped the write, recovery from disk is gone
            self._write_error = (f"stage snapshot {self.epoch} could not be written to {self.snapshots} "
                                 f"({type(e).__name__}: {first_line(e)}): a lost stage could not be recovered")
            raise ClusterError(self._write_error) from e
        finally:
            self.snapshot_wait_s += time.perf_counter() - t0

    def _load_snapshot(self) -> None:
        """A restarted stage: load the last snapshot its previous life wrote whole (the files its manifest names;
        vectors freed since included — the coordinator's replay frees them again in order)."""
        self.awaiting_recovery = True
        d = self.snapshots
        if d is None or not (d / "epoch.pt").is_file():
            return

        def load(f: str) -> Any:
            if f.endswith(".npy"):  # a vector's data (bfloat16 as its 16-bit pattern)
                return wire.as_tensor(np.load(d / f), self.dtype).to(self.device)
            return torch.load(d / f, map_location=self.device, weights_only=True)

        head = load("epoch.pt")
        self.epoch, self.manifest = int(head["epoch"]), dict(head["files"])
        rows: dict[int, list[tuple[int, str]]] = {}
        for key, name in self.manifest.items():
            if key[0] == "b":
                bid, j = (int(x) for x in key[1:].split("_"))
                rows.setdefault(bid, []).append((j, name))
        for key, name in self.manifest.items():
            if key[0] == "B":
                bid = int(key[1:])
                cap = int(load(name)[0])
                basis = self.bases[bid] = Basis(self.dim, self.dtype, self.device, cap or None,
                                                allocate=self._basis_allocate)
                for _, row in sorted(rows.get(bid, [])):
                    basis.append(load(row))
                self.persisted_rows[bid] = len(basis)
        for key, name in self.manifest.items():
            kind, vid = key[0], int(key[1:]) if key[0] in "vrd" else -1
            if kind == "v":
                self.vectors[vid] = load(name)
            elif kind == "r":
                bid, j = (int(x) for x in load(name))
                self._set(vid, self.bases[bid][j])
                self.row_of[vid] = (bid, j)
            elif kind == "d":  # dead vectors: NaN, so that reading one before writing it shows
                self._set(vid, torch.full((self.dim,), float("nan"), dtype=self.dtype, device=self.device))
                self.dead.add(vid)
            else:
                continue
            self.persisted.add(vid)

    def _set(self, vid: int, t: Tensor) -> Tensor:
        """vectors[vid] = t (a new value: written at the next snapshot)."""
        self.vectors[vid] = t
        self._written(vid)
        self.row_of.pop(vid, None)
        return t

    def _written(self, vid: int) -> None:
        """vectors[vid] has a new value: written at the next snapshot (and no longer dead: the next snapshot drops
        its marker)."""
        self.persisted.discard(vid)
        self.dead.discard(vid)

    def _out(self, vid: int) -> Tensor:
        """vectors[vid] to be overwritten in place (a new one if it does not exist)."""
        t = self.vectors.get(vid)
        if t is None or vid in self.row_of:  # new (or discarded), or a basis row's view
            t = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        else:
            self._settle_writes()  # a snapshot being written may hold this tensor
        return self._set(vid, t)

    # ------------------------------------------------------------------ vectors
    def put(self, i: int, t: wire.Packed | Tensor) -> None:
        self._set(i, wire.unpack(t, self.device).to(self.dtype))

    def get(self, i: int) -> wire.Packed:
        return wire.pack(self.vectors[i])

    def free(self, ids: list[int]) -> None:
        for i in ids:
            self.vectors.pop(i, None)
            self.row_of.pop(i, None)
            self.dead.discard(i)
            self.persisted.discard(i)  # its file is deleted once the next snapshot is written

    def discard(self, ids: list[int]) -> None:
        """The values of vectors ``ids`` are dead: each is written before it is read again. Their memory is let go
        until that write (:meth:`_out` allocates it again: a Lanczos run's work vector is not held through the next
        product), a snapshot records only a marker, and a restarted stage holds NaN there. A read before the write
        raises :class:`~curvdist.errors.SolverError` (and gives NaN after a restart): it shows, never passes
        silently."""
        for i in ids:
            if i in self.vectors and i not in self.dead:
                self.dead.add(i)
                self.persisted.discard(i)
                del self.vectors[i]
                self.row_of.pop(i, None)

    def dot(self, a: int, b: int) -> float:
        return dot64(self.vectors[a], self.vectors[b])

    def dots(self, ids: list[int], b: int) -> list[float]:
        y = self.vectors[b]
        return [dot64(self.vectors[i], y) for i in ids]

    def axpy(self, out: int, a: float, x: int, y: int) -> None:
        self._set(out, torch.add(self.vectors[y], self.vectors[x], alpha=a))

    def scale(self, out: int, a: float, x: int) -> None:
        self._set(out, self.vectors[x] * a)

    def mul(self, out: int, x: int, y: int) -> None:
        self._set(out, self.vectors[x] * self.vectors[y])

    def zeros(self, out: int) -> None:
        self._set(out, torch.zeros(self.dim, dtype=self.dtype, device=self.device))

    def random(self, out: int, seed: int, kind: str) -> None:
        """This stage's entries of the layout-independent random vector of ``seed`` (same numbers as locally)."""
        self._set(out, random_segments(self.total, seed, kind, self.dtype, self.segments).to(self.device))

    def lincomb(self, out: int, coeffs: list[float], ids: list[int]) -> None:
        """Σ c_i x_i, summed in float64 ``DOT_CHUNK`` entries at a time (no full-length float64 accumulator: at
        355M parameters in 2 stages that is 1.4 GB a stage)."""
        res = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        scratch = torch.empty(min(DOT_CHUNK, self.dim), dtype=torch.float64, device=self.device)
        for s in range(0, self.dim, DOT_CHUNK):
            acc = scratch[:min(DOT_CHUNK, self.dim - s)].zero_()
            for c, i in zip(coeffs, ids):
                acc.add_(self.vectors[i][s:s + DOT_CHUNK], alpha=c)  # cast on the fly
            res[s:s + DOT_CHUNK] = acc
        self._set(out, res)

    def sub_lincomb(self, out: int, coeffs: list[float], ids: list[int], y: int) -> None:
        """vectors[out] = vectors[y] − Σ c_i x_i (out may be y: in place), ``DOT_CHUNK`` entries at a time: the
        numbers of :meth:`lincomb` followed by :meth:`axpy` with a = −1, without the combination as a vector beside
        y and the result (a vector fewer: 0.8 GB a stage at 774M in 4 stages)."""
        src = self.vectors[y]
        dst = self._out(out)  # y's own tensor when out is y (and y is not a basis row's view)
        scratch = torch.empty(min(DOT_CHUNK, self.dim), dtype=torch.float64, device=self.device)
        for s in range(0, self.dim, DOT_CHUNK):
            acc = scratch[:min(DOT_CHUNK, self.dim - s)].zero_()
            for c, i in zip(coeffs, ids):
                acc.add_(self.vectors[i][s:s + DOT_CHUNK], alpha=c)
            torch.add(src[s:s + DOT_CHUNK], acc.to(self.dtype), alpha=-1.0, out=dst[s:s + DOT_CHUNK])

    # ------------------------------------------------------------------ bases
    def _basis(self, ref: BasisRef) -> Basis:
        bid, length, precise = ref
        view = self.bases[bid][:length]
        return view if precise else view.coarse()

    def basis_new(self, bid: int, capacity: int | None) -> None:
        self.bases[bid] = Basis(self.dim, self.dtype, self.device, capacity, allocate=self._basis_allocate)

    def basis_free(self, bids: list[int]) -> None:
        for bid in bids:
            self.bases.pop(bid, None)
            self.persisted_rows.pop(bid, None)  # its files are deleted once the next snapshot is written

    def basis_append(self, bid: int, vid: int, a: float) -> None:
        self.bases[bid].append(self.vectors[vid], a)

    def basis_rotate(self, bid: int, C: list[list[float]]) -> None:
        """Basis ``bid`` ← its first p combinations (a thick restart); its rows are written again at the next
        snapshot, and views of its old rows are stale (the solver drops them)."""
        self._settle_writes()  # a snapshot being written may hold its rows
        self.bases[bid].rotate_(np.asarray(C, dtype=np.float64))
        if bid in self.persisted_rows:
            self.persisted_rows[bid] = 0

    def basis_row(self, bid: int, j: int, out: int) -> None:
        """vectors[out] = row j of basis ``bid`` (a view; rows never change once appended)."""
        self._set(out, self.bases[bid][j])
        self.row_of[out] = (bid, j)

    def basis_dots(self, ref: BasisRef, y: int) -> np.ndarray:
        return self._basis(ref).dots(self.vectors[y])

    def basis_lincomb(self, out: int, coeffs: list[float], ref: BasisRef) -> None:
        self._set(out, self._basis(ref).lincomb(coeffs))

    def basis_subtract(self, ref: BasisRef, coeffs: list[float], y: int, out: int) -> None:
        """vectors[out] = vectors[y] − Σ c_i x_i (out may be y: in place)."""
        if out == y:
            self._settle_writes()  # a snapshot being written may hold y
        src = self.vectors[y]
        self._basis(ref).subtract(coeffs, src, out=self._out(out) if out != y else src)
        self._written(out)

    # ------------------------------------------------------------------ a Lanczos step's vector work, fused
    def basis_project(self, ref: BasisRef, q: int, w: int) -> np.ndarray:
        """[qᵀw, Qᵀw] of this stage's coordinates (Q the basis ``ref``): α's and the first pass's coefficients."""
        return np.concatenate([[dot64(self.vectors[q], self.vectors[w])], self.basis_dots(ref, w)])

    def basis_subtract_dots(self, ref: BasisRef, coeffs: list[float], y: int, out: int,
                            dots_ref: BasisRef) -> np.ndarray:
        """out = y − Q c, then the next pass's coefficients Qᵀout (basis ``dots_ref``)."""
        self.basis_subtract(ref, coeffs, y, out)
        return self.basis_dots(dots_ref, out)

    def basis_subtract_norm2(self, ref: BasisRef, coeffs: list[float], y: int, out: int) -> float:
        """out = y − Q c, then this stage's part of ‖out‖²."""
        self.basis_subtract(ref, coeffs, y, out)
        return self.dot(out, out)
