"""Pipeline mode, coordinator side of the vectors: handles to stage-held shards, their vector space, and the
lineage that recovers a lost stage.

Vectors are :class:`ShardedVector` handles and Lanczos bases :class:`ShardedBasis` handles; their shards stay on the
stage actors (:class:`~curvdist.distributed.shard_store.ShardStore`) and every vector-space operation is one call
per stage returning at most a few scalars, so Lanczos, Hutch++, XTrace, SLQ and CG run unchanged (DESIGN §4). Calls
that return nothing are submitted without waiting and checked at the next call that waits (:meth:`ShardedSpace.settle`).
:meth:`ShardedSpace.expand` fuses a Lanczos step's vector work — α, two passes of reorthogonalization against the
basis, β — into three rounds of one call per stage (the fewest that classical Gram-Schmidt applied twice allows:
each pass needs the previous one's coefficients, summed over the stages), with no temporary vector. Freed handles
release their shards.

Recovery (DESIGN §4, faults): stages write snapshots at the start of every ``snapshot_every``-th product. Since the
last snapshot the space logs every operation that changes a stage's shards, and each product; when Ray restarts a
stage (it loads the last snapshot), the log is replayed on it — a logged product runs through every stage again,
the others writing into scratch vectors — and the interrupted call is run again: the solve continues to the numbers
of an uninterrupted run. The inputs of logged products stay alive on the stages until the next snapshot, so K
products between snapshots cost up to K more vectors a stage in memory and save K − 1 snapshot writes.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError, SolverError
from ..solvers.space import assemble, select
from . import wire
from .cluster import ClusterError, is_lost, wait_alive

#: the stage methods that change what a stage holds (logged for replay after a restart)
CHANGES = frozenset({"put", "free", "discard", "axpy", "scale", "mul", "zeros", "random", "lincomb", "sub_lincomb",
                     "basis_new",
                     "basis_free", "basis_append", "basis_row", "basis_lincomb", "basis_subtract",
                     "basis_subtract_dots", "basis_subtract_norm2", "basis_rotate", "metric_apply"})


class ShardedVector:
    """A handle to a vector whose shards live on the stage actors."""

    __slots__ = ("id", "space", "__weakref__")

    def __init__(self, space: ShardedSpace, vid: int) -> None:
        self.id, self.space = vid, space
        weakref.finalize(self, space._release, vid)


class ShardedBasis(Sequence[ShardedVector]):
    """A handle to an append-only Lanczos basis whose rows live on the stages as
    :class:`~curvdist.solvers.space.Basis` shards (the local kernels); ``basis[j]`` is a vector viewing row j,
    ``basis[:m]`` and :meth:`coarse` read-only views, as for :class:`~curvdist.solvers.space.Basis`."""

    def __init__(self, space: ShardedSpace, capacity: int | None, root: ShardedBasis | None = None,
                 length: int | None = None, precise: bool = True) -> None:
        self.space, self.precise = space, precise
        self.root = root or self
        if root is None:
            self.id = next(space._ids)
            self._len = 0
            space._submit("basis_new", self.id, capacity)
            weakref.finalize(self, space._release_basis, self.id)
        else:
            self.id, self._len = root.id, root._len if length is None else length

    @property
    def read_only(self) -> bool:
        return self.root is not self

    @property
    def ref(self) -> tuple[int, int, bool]:
        """How the stages name this basis (or view): (id, rows, precise dots)."""
        return self.id, len(self), self.precise

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if start != 0 or step != 1:
                raise SolverError("a basis supports prefix slices basis[:m] only")
            return ShardedBasis(self.space, None, self.root, max(stop, 0), self.precise)
        j = int(i) + len(self) if int(i) < 0 else int(i)
        if not 0 <= j < len(self):
            raise IndexError(f"basis index {i} out of range for {len(self)} vectors")
        out = self.space._new()
        self.space._submit("basis_row", self.id, j, out.id)
        return out

    def __iter__(self) -> Iterator[ShardedVector]:
        for j in range(len(self)):
            yield self[j]

    def coarse(self) -> ShardedBasis:
        """A read-only view whose dots are plain products in the working dtype (the first reorthogonalization
        pass: :meth:`~curvdist.solvers.space.Basis.coarse`)."""
        return ShardedBasis(self.space, None, self.root, len(self), precise=False)

    def rotate_(self, C: np.ndarray) -> None:
        """Rows ← the first p combinations Q C (C of shape (n, p)) in place on every stage (a thick restart)."""
        if self.read_only:
            raise SolverError("cannot rotate a view of a basis")
        C = np.asarray(C, dtype=np.float64)
        self.space._submit("basis_rotate", self.id, C.tolist())
        self._len = C.shape[1]

    def append(self, v: ShardedVector, scale: float = 1.0) -> None:
        """Copy ``scale · v`` into the next row on every stage."""
        if self.read_only:
            raise SolverError("cannot append to a prefix view of a basis")
        self.space._submit("basis_append", self.id, v.id, float(scale))
        self._len += 1


class ShardedSpace:
    """The :class:`~curvdist.solvers.space.VectorSpace` of stage-sharded vectors.

    ``snapshot_every``: products between stage snapshots (None: no snapshots, so no recovery — a lost stage
    ends the solve).
    """

    def __init__(self, actors: list[Any], dims: list[int], dtype: torch.dtype,
                 segments: list[list[tuple[int, int]]] | None = None, snapshot_every: int | None = 1,
                 bases_off_memory: bool = False) -> None:
        import ray

        #: the stages keep basis rows off their working memory (``basis_on_disk``): solvers may hold vectors they
        #: keep for long (Hutch++'s Q) as a basis, to be out of the stages' resident memory between passes
        self.bases_off_memory = bool(bases_off_memory)
        self.ray, self.actors, self.dims, self.dtype = ray, actors, dims, dtype
        self.dim = sum(dims)
        if segments is None:  # stage after stage
            offsets = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(int).tolist()
            segments = [[(o, d)] for o, d in zip(offsets, dims)]
        #: per stage, the (offset, length) pieces of the problem's flat layout it owns, in its own order
        self.segments = segments
        self.snapshot_every = snapshot_every
        self._ids = itertools.count(1)
        self._garbage: list[int] = []
        #: (stage, ref) of calls submitted without waiting (:meth:`_submit`), checked at the next wait (:meth:`settle`)
        self._pending: list[tuple[int, Any]] = []
        self._garbage_bases: list[int] = []
        #: since the last snapshot: ("call", method, args, stages — None: all) and ("product", replay, inputs) entries
        self.log: list[tuple[Any, ...]] = []
        self._previous: tuple[int, list[tuple[Any, ...]]] | None = None  # (epoch, log) until a snapshot is written
        self.epoch = -1  # the last snapshot asked of the stages (-1: none yet; a restart then starts empty)
        self.products = 0
        self.recoveries = 0
        self.replayed_products = 0  # products run again onto restarted stages
        self.lives = [token for token, _ in ray.get([a.life.remote() for a in actors])]

    # ------------------------------------------------------------ plumbing
    def _new(self) -> ShardedVector:
        return ShardedVector(self, next(self._ids))

    def _release(self, vid: int) -> None:
        self._garbage.append(vid)

    def _release_basis(self, bid: int) -> None:
        self._garbage_bases.append(bid)

    def flush(self) -> None:
        """Free the shards of dropped handles on every stage now (one asynchronous call each; an actor runs it
        before any later call). Shards of a 100M-parameter model are hundreds of MB, so nothing is batched."""
        for method, garbage in (("free", self._garbage), ("basis_free", self._garbage_bases)):
            if garbage:
                ids = list(garbage)
                garbage.clear()
                if self.snapshot_every is not None:
                    self.log.append(("call", method, (ids,), None))
                for a in self.actors:
                    getattr(a, method).remote(ids)

    def _call(self, method: str, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[Any]]:
        """Submit ``method(*args)`` to every stage (logged when it changes shards): the log entry and the refs."""
        self.flush()
        entry = ("call", method, args, None)
        if method in CHANGES and self.snapshot_every is not None:
            self.log.append(entry)
        return entry, [getattr(a, method).remote(*args) for a in self.actors]

    def _all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every stage, waited for; a stage Ray restarted meanwhile is recovered and the call
        completed."""
        entry, refs = self._call(method, args)
        try:
            return self.settle(refs)
        except Exception as e:  # noqa: BLE001 - a lost stage is recovered, anything else raised as it is
            if not is_lost(self.ray, e):
                raise
            restarted = self.recover(e, skip=entry)
        results = [getattr(self.actors[s], method).remote(*args) if s in restarted else refs[s]
                   for s in range(len(self.actors))]
        return self.settle(results)

    def _submit(self, method: str, *args: Any) -> None:
        """``method(*args)`` on every stage without waiting, for the calls that return nothing (they make or change
        shards): a round trip saved per call. An actor runs its calls in submission order, so no later call reads
        a shard before it is written; the outcome is checked at the next call that waits (:meth:`settle`), where a
        stage lost meanwhile is recovered (the call is in the log) and any other error is raised."""
        _, refs = self._call(method, args)
        self._pending.extend(enumerate(refs))

    def settle(self, refs: Sequence[Any] = ()) -> list[Any]:
        """``ray.get(refs)``, after the calls submitted without waiting: their errors are raised first."""
        n = len(self._pending)
        try:
            out = self.ray.get([r for _, r in self._pending] + list(refs))
        except Exception as e:  # noqa: BLE001 - kept for recovery when a stage was lost, else they are done with
            if not is_lost(self.ray, e):
                self._pending.clear()
            raise
        del self._pending[:n]
        return out[n:]

    # ------------------------------------------------------------ snapshots and recovery
    def snapshot_point(self, force: bool = False) -> int | None:
        """Called at the start of a product: frees the dropped vectors (before the stages could write them), and
        returns the epoch the stages should snapshot at its start (every ``snapshot_every``-th product, or
        ``force``), or None. A snapshot starts a new log; the previous one is kept until every stage has written
        the snapshot (:meth:`confirm_snapshot`)."""
        self.flush()
        if self.snapshot_every is None:
            return None
        due = force or self.products % self.snapshot_every == 0
        self.products += 1
        if not due:
            return None
        self._previous = (self.epoch, self.log)
        self.log = []
        self.epoch += 1
        return self.epoch

    def confirm_snapshot(self) -> None:
        """Every stage wrote the last snapshot: the log before it is dropped (and the product inputs it kept)."""
        self._previous = None

    def record_product(self, replay: Callable[[set[int]], None] | None, inputs: Sequence[Any] = ()) -> None:
        """Log a finished product: ``replay(restarted)`` runs it again, writing the real output on the restarted
        stages only (None: it cannot be replayed, e.g. a gradient during training); ``inputs`` (handles) stay alive
        until the next snapshot, since a replay needs them on every stage."""
        if self.snapshot_every is not None:
            self.log.append(("product", replay, tuple(inputs)))

    def recover(self, error: BaseException, skip: Any = None) -> set[int]:
        """After a stage was lost: wait until Ray restarted it, check it holds the last snapshot, and replay the log
        since (except ``skip``, the interrupted call) on it. Returns the restarted stages."""
        if self.snapshot_every is None:
            raise ClusterError("a stage actor died and stage snapshots are off: pipeline vectors live on the actors, "
                               "so the solve must restart from its last checkpoint") from error
        for i, a in enumerate(self.actors):
            wait_alive(self.ray, a, f"stage {i}")
        lives = self.ray.get([a.life.remote() for a in self.actors])
        restarted = {s for s, (token, _) in enumerate(lives) if token != self.lives[s]}
        epochs = {lives[s][1] for s in restarted}
        log = self.log
        if self._previous is not None and epochs == {self._previous[0]}:  # died before writing the new snapshot
            log = self._previous[1] + self.log
        elif epochs != {self.epoch}:
            raise ClusterError(f"stages {sorted(restarted)} came back with snapshots {sorted(epochs)}, the solve "
                               f"is at snapshot {self.epoch}: restart the solve from its last checkpoint") from error
        self.ray.get([self.actors[s].resume.remote() for s in sorted(restarted)])
        for entry in list(log):
            if entry is skip:
                continue
            if entry[0] == "call":
                _, method, args, stages = entry
                on = sorted(restarted if stages is None else restarted & stages)
                self.ray.get([getattr(self.actors[s], method).remote(*args) for s in on])
            elif entry[1] is None:
                raise ClusterError("a stage was lost after a gradient step since the last snapshot, which cannot be "
                                   "replayed: restart the run from its checkpoint") from error
            else:
                entry[1](restarted)
                self.replayed_products += 1
        self.lives = [token for token, _ in lives]
        # the restarted stages' unanswered calls are in the log, just replayed; the others' are still checked
        self._pending = [(s, r) for s, r in self._pending if s not in restarted]
        self.recoveries += 1
        return restarted

    # ------------------------------------------------------------ the interface
    def dot(self, x: ShardedVector, y: ShardedVector) -> float:
        return float(sum(self._all("dot", x.id, y.id)))

    def dots(self, xs: Sequence[ShardedVector] | ShardedBasis, y: ShardedVector) -> np.ndarray:
        if isinstance(xs, ShardedBasis):
            if not len(xs):
                return np.zeros(0)
            return np.sum(np.array(self._all("basis_dots", xs.ref, y.id)), axis=0)
        if not xs:
            return np.zeros(0)
        return np.sum(np.array(self._all("dots", [x.id for x in xs], y.id)), axis=0)

    def norm(self, x: ShardedVector) -> float:
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def discard(self, x: ShardedVector) -> None:
        """x's value is dead: the solver writes x before it reads it again (a Lanczos run's work vector once it was
        copied into the basis). The stages keep its memory but snapshot only a marker — a row of the basis fewer
        written per step — and a stage restarted from such a snapshot holds NaN in x, so a read before a write
        would show rather than give other numbers."""
        self._submit("discard", [x.id])

    def axpy(self, a: float, x: ShardedVector, y: ShardedVector) -> ShardedVector:
        out = self._new()
        self._submit("axpy", out.id, float(a), x.id, y.id)
        return out

    def scale(self, a: float, x: ShardedVector) -> ShardedVector:
        out = self._new()
        self._submit("scale", out.id, float(a), x.id)
        return out

    def mul(self, x: ShardedVector, y: ShardedVector) -> ShardedVector:
        out = self._new()
        self._submit("mul", out.id, x.id, y.id)
        return out

    def zeros(self) -> ShardedVector:
        out = self._new()
        self._submit("zeros", out.id)
        return out

    def random(self, seed: int, kind: str = "rademacher") -> ShardedVector:
        out = self._new()
        self._submit("random", out.id, int(seed), kind)
        return out

    def lincomb(self, coeffs: np.ndarray, xs: Sequence[ShardedVector] | ShardedBasis) -> ShardedVector:
        out = self._new()
        c = [float(x) for x in coeffs]
        if isinstance(xs, ShardedBasis):
            self._submit("basis_lincomb", out.id, c, xs.ref)
        else:
            self._submit("lincomb", out.id, c, [x.id for x in xs])
        return out

    def new_basis(self, capacity: int | None = None) -> ShardedBasis:
        """An empty basis for about ``capacity`` vectors, its rows preallocated on the stages."""
        return ShardedBasis(self, capacity)

    def sub_lincomb(self, coeffs: np.ndarray, xs: Sequence[ShardedVector] | ShardedBasis, y: ShardedVector,
                    out: ShardedVector | None = None) -> ShardedVector:
        """y − Σ c_i x_i, into ``out`` when given (it may be y: in place) and returned: one stage call, whose
        numbers are those of ``axpy(-1, lincomb(c, xs), y)``; in place it needs no vector beside y and the x_i."""
        out = out if out is not None else self._new()
        if not isinstance(xs, ShardedBasis):
            self._submit("sub_lincomb", out.id, [float(c) for c in coeffs], [x.id for x in xs], y.id)
            return out
        self._submit("basis_subtract", xs.ref, [float(c) for c in coeffs], y.id, out.id)
        return out

    def expand(self, basis: ShardedBasis, q: ShardedVector, w: ShardedVector,
               out: ShardedVector | None = None) -> tuple[float, ShardedVector, float]:
        """A Lanczos step's vector work for w = A q against the basis Q (whose last row is q), fused: α = qᵀw, then
        w ← w − Q(Qᵀw) twice (first pass coarse) into ``out``, and β = ‖w‖. The same numbers as
        ``dot``, ``dots``/``sub_lincomb`` twice and ``norm`` one by one, in three rounds of calls."""
        out = out if out is not None else self._new()
        first = np.array(self._all("basis_project", basis.coarse().ref, q.id, w.id))
        alpha = float(sum(first[:, 0]))
        c1 = np.sum(first[:, 1:], axis=0)
        c2 = np.sum(np.array(self._all("basis_subtract_dots", basis.ref, [float(c) for c in c1], w.id, out.id,
                                       basis.ref)), axis=0)
        n2 = float(sum(self._all("basis_subtract_norm2", basis.ref, [float(c) for c in c2], out.id, out.id)))
        return alpha, out, float(np.sqrt(max(n2, 0.0)))

    def to_tensor(self, x: ShardedVector) -> Tensor:
        return assemble(self.dim, list(zip(self.segments, (wire.unpack(p) for p in self._all("get", x.id)))))

    def from_tensor(self, t: Tensor) -> ShardedVector:
        if t.ndim != 1 or t.numel() != self.dim:
            raise ShapeError(f"expected a flat vector of length {self.dim}, got {tuple(t.shape)}")
        out = self._new()
        t = t.cpu()
        pieces = [wire.pack(select(t, segs)) for segs in self.segments]
        if self.snapshot_every is not None:  # each stage its own piece: one logged call per stage
            self.log.extend(("call", "put", (out.id, piece), {s}) for s, piece in enumerate(pieces))
        self.settle([a.put.remote(out.id, piece) for a, piece in zip(self.actors, pieces)])
        return out
