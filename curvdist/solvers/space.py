"""The vector-space interface the solvers speak.

Solvers never touch vector storage: they call these few methods and keep only scalars (float64 numpy) on the
coordinator. A local implementation holds flat torch tensors; the distributed backend holds shards on actors.
Random vectors are a function of an integer seed alone (not of the layout), so a sharded space reproduces the
local numbers exactly.

Optional extras a solver uses when a space has them (:func:`~curvdist.solvers.lanczos.lanczos` does): ``new_basis``
(an append-only sequence of vectors that ``dots``/``lincomb`` accept, preallocated) and ``sub_lincomb`` (y − Σ c_i x_i
into a given output vector). :class:`TorchSpace` has both, with :class:`Basis`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import SolverError

Vector = Any
LinearMap = Callable[[Vector], Vector]
#: a block product: [x₁, …, x_k] ↦ [A x₁, …, A x_k] in one call (e.g. ``CurvatureOperator.apply_vectors``)
BlockMap = Callable[[Sequence[Vector]], Sequence[Vector]]

PROBE_KINDS = ("rademacher", "gaussian")

#: coordinates per float32 partial sum of :meth:`Basis.dots` (blocked summation: each block's sum is taken in float32,
#: the blocks' sums in float64)
DOT_BLOCK = 128
#: coordinates per call of :meth:`Basis.dots`'s blocked product (a multiple of ``DOT_BLOCK``)
DOT_SLICE = 1 << 22

# Elements per slice when the inner product of float32 (or lower precision) vectors on the CPU is taken in float64:
# each slice is converted and multiplied in cache, so there is no float64 copy of a whole vector.
CHUNK = 1 << 15

#: coordinates per slice of a pass over blocks that can be released (:class:`~curvdist.solvers.file_blocks.FileBlocks`):
#: each slice's pages leave the resident memory once the pass has used them (16 MB of a float32 row)
RELEASE_SLICE = DOT_SLICE


@contextmanager
def serial() -> Iterator[None]:
    """Run the block on one intra-op thread (torch and MKL), restoring the count after.

    For loops over cache-sized slices: every multi-threaded op is a parallel region, and when the machine's cores
    are busy with other work a region waits for a descheduled thread — thousands of small regions then cost far
    more than the work (measured: 110 s of CPU instead of 8 s for 30 Lanczos steps at d = 1.1·10⁷).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@runtime_checkable
class VectorSpace(Protocol):
    """ℝ^d with the Euclidean inner product, as seen by a solver."""

    dim: int

    def dot(self, x: Vector, y: Vector) -> float: ...
    def axpy(self, a: float, x: Vector, y: Vector) -> Vector: ...  # a·x + y
    def scale(self, a: float, x: Vector) -> Vector: ...
    def norm(self, x: Vector) -> float: ...
    def zeros(self) -> Vector: ...
    def random(self, seed: int, kind: str = "rademacher") -> Vector: ...
    def mul(self, x: Vector, y: Vector) -> Vector: ...  # elementwise x ⊙ y (diagonal estimators)
    def dots(self, xs: Sequence[Vector], y: Vector) -> np.ndarray: ...  # [x_iᵀ y]_i
    def lincomb(self, coeffs: np.ndarray, xs: Sequence[Vector]) -> Vector: ...  # Σ_i c_i x_i
    def to_tensor(self, x: Vector) -> Tensor: ...  # gather into one flat tensor
    def from_tensor(self, t: Tensor) -> Vector: ...  # scatter a flat tensor (checkpoint restore)


def check_block(block_apply: BlockMap | None, block: int | None) -> None:
    """Validate a solver's opt-in block products: ``block`` (vectors per call) needs ``block_apply``."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1):
        raise SolverError(f"block must be a positive integer or None, got {block!r}")
    if block is not None and block_apply is None:
        raise SolverError("block= sets the vectors per block product: pass block_apply too")
    if block_apply is not None and not callable(block_apply):
        raise SolverError(f"block_apply must be callable, got {type(block_apply).__name__}")


def products(apply: LinearMap | None, vectors: Iterable[Vector], block_apply: BlockMap | None = None,
             block: int | None = None) -> Iterator[tuple[Vector, Vector]]:
    """(x, A x) for every x of ``vectors``, consumed lazily: one ``apply(x)`` at a time when ``block_apply`` is None
    (the solvers' default: single products, in order), else ``block_apply`` on consecutive groups of at most
    ``block`` vectors (default: all of them in one call). A pair (or group) the consumer let go of is not held
    here while the next vector is made."""
    if block_apply is None:
        assert apply is not None
        for x in vectors:
            yield x, apply(x)
            del x  # not alive while the next vector is made
        return
    it = iter(vectors)
    while True:
        group = list(itertools.islice(it, block)) if block is not None else list(it)
        if not group:
            return
        out = list(block_apply(group))
        if len(out) != len(group):
            raise SolverError(f"block_apply returned {len(out)} vectors for {len(group)}")
        yield from zip(group, out)
        del group, out


def apply_all(apply: LinearMap | None, vectors: Sequence[Vector], block_apply: BlockMap | None = None,
              block: int | None = None) -> list[Vector]:
    """[A x for x in vectors] by :func:`products`."""
    return [ax for _, ax in products(apply, vectors, block_apply, block)]


def random_flat(dim: int, seed: int, kind: str, dtype: torch.dtype) -> Tensor:
    """The layout-independent random vector of a seed, generated on the CPU in float64 and then cast.

    ``rademacher``: entries ±1 with probability ½; ``gaussian``: standard normal entries.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    elif kind == "gaussian":
        v = torch.randn(dim, generator=g, dtype=torch.float64)
    else:
        raise SolverError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    return v.to(dtype)


#: entries per draw of :func:`random_segments`: a multiple of 16, the block torch's CPU ``randn`` transforms at once
STREAM_CHUNK = 1 << 20


def random_segments(dim: int, seed: int, kind: str, dtype: torch.dtype,
                    segments: Sequence[tuple[int, int]]) -> Tensor:
    """The entries ``segments`` = [(offset, length), …] of ``random_flat(dim, seed, kind, dtype)``, concatenated in
    that order, without making the full vector: the generator's stream is drawn ``STREAM_CHUNK`` entries at a time
    and only the requested pieces are kept (memory O(chunk + Σ length)).

    The stream is the same as one draw of ``dim`` entries because torch's CPU generator draws integers one by one
    and ``randn`` transforms blocks of 16: every chunk but the last is a multiple of 16 long, and the last one is at
    least 16 long (a short remainder joins the chunk before it), so its tail is treated as in the single draw. A
    test compares the two draws entry by entry, so a torch release that changes this is caught.
    """
    if kind not in PROBE_KINDS:
        raise SolverError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    segments = [(int(a), int(n)) for a, n in segments if n > 0]
    total = sum(n for _, n in segments)
    out = torch.empty(total, dtype=dtype)
    if not segments:
        return out
    order = sorted(range(len(segments)), key=lambda i: segments[i][0])
    starts = np.concatenate([[0], np.cumsum([n for _, n in segments])[:-1]]).astype(int)
    end = max(a + n for a, n in segments)
    if end > dim:
        raise SolverError(f"a segment ends at {end}, beyond the vector's length {dim}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    bounds = list(range(0, dim, STREAM_CHUNK)) + [dim]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        del bounds[-2]
    k = 0  # the first segment (in offset order) not yet completely written
    for lo, hi in itertools.pairwise(bounds):
        if lo >= end:
            break
        if kind == "rademacher":
            chunk = torch.randint(0, 2, (hi - lo,), generator=g, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
        else:
            chunk = torch.randn(hi - lo, generator=g, dtype=torch.float64)
        while k < len(order) and segments[order[k]][0] + segments[order[k]][1] <= lo:
            k += 1
        for i in order[k:]:
            a, n = segments[i]
            if a >= hi:
                break
            s, e = max(a, lo), min(a + n, hi)
            if s < e:
                o = int(starts[i]) + s - a
                out[o:o + e - s] = chunk[s - lo:e - lo]
    return out


def assemble(dim: int, pieces: Sequence[tuple[Sequence[tuple[int, int]], Tensor]]) -> Tensor:
    """The flat vector of length ``dim`` from its pieces: each (segments, values) holds, one after another, the entries
    at the (offset, length) segments of the flat layout (a pipeline stage's shard, a ZeRO-3 rank's partitions)."""
    out = torch.empty(dim, dtype=pieces[0][1].dtype)
    for segments, values in pieces:
        i = 0
        for off, n in segments:
            out[off:off + n] = values[i:i + n]
            i += n
    return out


def select(t: Tensor, segments: Sequence[tuple[int, int]]) -> Tensor:
    """The entries of the flat vector ``t`` at ``segments``, one after another (the inverse of :func:`assemble`)."""
    return torch.cat([t[off:off + n] for off, n in segments] or [t[:0]])


def probe_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from one user seed (numpy SeedSequence)."""
    state = np.random.SeedSequence(int(seed)).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


class Basis(Sequence[Tensor]):
    """An append-only sequence of vectors of ℝ^d held as the rows of preallocated (rows, d) blocks.

    The blocks are in the working dtype and on the space's device; vectors are copied in once (:meth:`append`) and
    never restacked. Products with the whole basis are a few matrix-vector products per block: :meth:`dots` gives
    [x_iᵀ y]_i summed in float64 (float32 data: in blocks of ``DOT_BLOCK`` coordinates; others through a small
    float64 scratch buffer);
    :meth:`subtract` and :meth:`lincomb` form y − Σ c_i x_i and Σ c_i x_i in the working dtype.

    Blocks are allocated as needed, ``block_rows`` rows at a time (the first one ``min(capacity, block_rows)``), and
    uninitialized, so rows never written cost no physical memory on the CPU. ``allocate(rows, dim)`` replaces
    ``torch.empty`` for the blocks; when it also has ``release(view)`` (e.g.
    :class:`~curvdist.solvers.file_blocks.FileBlocks`: rows in memory-mapped files, out of the working memory), every
    pass over the rows goes ``RELEASE_SLICE`` coordinates at a time and releases each slice of every block once
    used, so the process holds about a slice of each row, not the basis. ``basis[:m]`` is a read-only view of the
    first m vectors; ``basis[j]`` a view of row j (do not modify it).
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int | None = None,
                 block_rows: int = 32, allocate: Callable[[int, int], Tensor] | None = None) -> None:
        if block_rows < 1:
            raise SolverError(f"block_rows must be positive, got {block_rows!r}")
        self.dim, self.dtype, self.device = int(dim), dtype, torch.device(device)
        self.capacity = None if capacity is None else max(int(capacity), 1)
        self.block_rows = int(block_rows)
        self._blocks: list[Tensor] = []
        self._len = 0
        self._view = False
        self._precise = True
        self._root = self  # views share the root's blocks and scratch
        self._scratch_buffer: Tensor | None = None
        self._allocate = allocate
        self._release: Callable[[Tensor], None] | None = getattr(allocate, "release", None)

    # ------------------------------------------------------------ the sequence
    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> Basis: ...

    def __getitem__(self, i: int | slice) -> Tensor | Basis:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            if start != 0 or step != 1:
                raise SolverError("a Basis supports prefix slices basis[:m] only")
            return self._viewed(length=max(stop, 0))
        j = int(i) + self._len if int(i) < 0 else int(i)
        if not 0 <= j < self._len:
            raise IndexError(f"basis index {i} out of range for {self._len} vectors")
        return self._row(j)

    def _viewed(self, length: int | None = None, precise: bool | None = None) -> Basis:
        view = Basis.__new__(Basis)
        view.__dict__.update(self.__dict__)
        view._blocks, view._view = list(self._blocks), True
        view._len = self._len if length is None else length
        view._precise = self._precise if precise is None else precise
        return view

    @property
    def read_only(self) -> bool:
        """True for a view (``basis[:m]``, :meth:`coarse`), which cannot be appended to."""
        return self._view

    def coarse(self) -> Basis:
        """A read-only view whose :meth:`dots` are plain matrix-vector products in the working dtype (faster, with
        relative error up to about √d·ε of the dtype): enough for the first of two orthogonalization passes."""
        return self._viewed(precise=False)

    def __iter__(self) -> Iterator[Tensor]:
        for _, blk in self.blocks():
            yield from blk

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row index, filled rows of the block) for every block holding vectors."""
        r0 = 0
        for blk in self._blocks:
            n = min(blk.shape[0], self._len - r0)
            if n <= 0:
                return
            yield r0, blk[:n]
            r0 += n

    def append(self, v: Tensor, scale: float = 1.0) -> None:
        """Copy ``scale · v`` into the next free row."""
        if self._view:
            raise SolverError("cannot append to a prefix view of a Basis")
        if v.shape != (self.dim,):
            raise SolverError(f"expected a flat vector of length {self.dim}, got {tuple(v.shape)}")
        allocated = sum(b.shape[0] for b in self._blocks)
        if self._len == allocated:
            rows = self.block_rows
            if self.capacity is not None and self.capacity > allocated:
                rows = min(rows, self.capacity - allocated)
            self._blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device)
                                if self._allocate is None else self._allocate(rows, self.dim))
        row = self._row(self._len)
        for s, e in self._spans():
            if scale == 1.0:
                row[s:e].copy_(v[s:e])
            else:
                torch.mul(v[s:e].to(self.dtype), float(scale), out=row[s:e])
            self._released(s, e)
        self._len += 1

    def _spans(self) -> list[tuple[int, int]]:
        """The coordinate ranges a pass over the rows takes one at a time: the whole rows for blocks in memory,
        ``RELEASE_SLICE`` coordinates for blocks that can be released (each released by :meth:`_released`)."""
        if self._release is None:
            return [(0, self.dim)]
        return [(s, min(s + RELEASE_SLICE, self.dim)) for s in range(0, self.dim, RELEASE_SLICE)]

    def _released(self, s: int, e: int) -> None:
        """A pass is done with coordinates [s, e): drop them from the resident memory where the blocks can be
        released (a no-op for blocks in memory)."""
        if self._release is not None:
            for blk in self._blocks:
                self._release(blk[:, s:e])

    def _row(self, j: int) -> Tensor:
        for blk in self._blocks:
            if j < blk.shape[0]:
                return blk[j]
            j -= blk.shape[0]
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ products with the whole basis
    def dots(self, y: Tensor) -> np.ndarray:
        """[x_iᵀ y]_i over the basis vectors x_i, accumulated in float64 (one pass over the basis).

        float64 data: one matrix-vector product per block. float32 data: blocked summation — the sum over each block
        of ``DOT_BLOCK`` consecutive coordinates in float32 (a batched product, no copy), the blocks' sums in
        float64. Its error is at most about ``DOT_BLOCK``·ε₃₂·Σ|x_i y_i| and in practice far below the rounding of
        the float32 data themselves: 5e-10 relative for same-sign entries at d = 4·10⁷, where a plain float32
        matrix-vector product loses 3e-4 (its error grows with d), which would spoil the reorthogonalization. It is
        2-2.5× faster than converting to float64, alone and beside a busy process.
        float16/bfloat16 data, and rows longer than 2³¹ (a batched product's leading dimension): a cache-sized
        slice of the coordinates at a time is copied to float64 scratch and multiplied there. On the CPU
        all of it runs on one thread (see :func:`serial`). (A :meth:`coarse` view takes the plain product in the
        working dtype instead.)
        """
        out = torch.zeros(self._len, dtype=torch.float64, device=self.device)
        if self._len == 0:
            return out.cpu().numpy()
        if self.dtype == torch.float64 or not self._precise:
            y = y.to(self.dtype)
            for s, e in self._spans():
                for r0, blk in self.blocks():
                    out[r0 : r0 + blk.shape[0]] += torch.mv(blk[:, s:e], y[s:e])
                self._released(s, e)
            return out.cpu().numpy()
        with serial() if self.device.type == "cpu" else nullcontext():
            if self.dtype == torch.float32 and self.dim < 2**31:
                self._blocked_dots(y.to(self.dtype), out)
            else:
                self._scratch_dots(y, out)
        return out.cpu().numpy()

    def _blocked_dots(self, y: Tensor, out: Tensor) -> None:
        """out += [x_iᵀ y]_i by blocked summation (float32 sums of ``DOT_BLOCK`` coordinates, summed in float64)."""
        k = DOT_BLOCK
        for s in range(0, self.dim, DOT_SLICE):
            e = min(s + DOT_SLICE, self.dim)
            n = (e - s) // k * k  # only the last slice has a remainder
            yb = y[s : s + n].view(n // k, k, 1)
            for r0, blk in self.blocks():
                acc = out[r0 : r0 + blk.shape[0]]
                # row by row, (n/k, 1, k) @ (n/k, k, 1): row i's partial sums over the blocks of this slice. One
                # product of all rows, (n/k, rows, k) @ (n/k, k, 1), gives the same numbers but from 4 rows on
                # runs 2-5x slower a row on the CPU (1.3 s against 0.3 s for 12 rows of 81M coordinates)
                for i in range(blk.shape[0] if n else 0):
                    parts = torch.bmm(blk[i : i + 1, s : s + n].unflatten(1, (n // k, k)).transpose(0, 1), yb)
                    acc[i] += parts.sum(dtype=torch.float64)
                if s + n < e:
                    acc.add_(torch.mv(blk[:, s + n : e].double(), y[s + n : e].double()))
            self._released(s, e)

    def _scratch_dots(self, y: Tensor, out: Tensor) -> None:
        """out += [x_iᵀ y]_i with the products and sums in float64, a slice at a time through float64 scratch."""
        rows = max(blk.shape[0] for _, blk in self.blocks())
        flat = self._scratch()
        step = max(1, min(self.dim, flat.numel() // (rows + 1)))
        ys = flat[:step]
        for s in range(0, self.dim, step):
            n = min(step, self.dim - s)
            ys[:n].copy_(y[s : s + n])
            for r0, blk in self.blocks():
                m = blk.shape[0]
                S = flat[step : step + m * n].view(m, n)
                S.copy_(blk[:, s : s + n])
                out[r0 : r0 + m].add_(torch.mv(S, ys[:n]))
            self._released(s, s + n)

    def _scratch(self) -> Tensor:
        """The flat float64 scratch of :meth:`dots`: 8 MiB (32 MiB on a GPU), allocated on first use."""
        root = self._root
        if root._scratch_buffer is None:
            size = 1 << 20 if self.device.type == "cpu" else 1 << 22
            root._scratch_buffer = torch.empty(size, dtype=torch.float64, device=self.device)
        return root._scratch_buffer

    def _coeffs(self, coeffs: np.ndarray | Sequence[float]) -> Tensor:
        c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
        if len(c) > self._len:
            raise SolverError(f"{len(c)} coefficients for a basis of {self._len} vectors")
        return torch.as_tensor(c, device=self.device).to(self.dtype)

    def subtract(self, coeffs: np.ndarray | Sequence[float], y: Tensor, out: Tensor | None = None) -> Tensor:
        """y − Σ_i c_i x_i over the first len(coeffs) vectors, in the working dtype, written into ``out`` (a vector of
        the working dtype; it may be y itself, for an update in place) or into a new vector; returns it."""
        c = self._coeffs(coeffs)
        if out is None:
            out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        elif out.dtype != self.dtype or out.shape != (self.dim,):
            raise SolverError(f"out must be a flat {self.dtype} vector of length {self.dim}, got {out.dtype} "
                              f"{tuple(out.shape)}")
        y = y.to(self.dtype)
        for s, e in self._spans():
            src, dst = y[s:e], out[s:e]
            for r0, blk in self.blocks():
                n = min(blk.shape[0], len(c) - r0)
                if n <= 0:
                    break
                torch.addmv(src, blk[:n, s:e].T, c[r0 : r0 + n], alpha=-1, out=dst)
                src = dst
            if src is not dst:  # no coefficients
                dst.copy_(src)
            self._released(s, e)
        return out

    def rotate_(self, C: np.ndarray, chunk: int = 1 << 16) -> None:
        """Replace the basis X = [x_1 … x_n] by its first p combinations X C (C of shape (n, p), p ≤ n) in place,
        a slice of ``chunk`` coordinates at a time (combinations in float64; scratch O(n · chunk)): the Ritz vectors
        a thick restart keeps, with no second basis."""
        if self._view:
            raise SolverError("cannot rotate a view of a Basis")
        C = np.asarray(C, dtype=np.float64)
        n, p = C.shape
        if n != self._len or p > n:
            raise SolverError(f"rotation of shape {C.shape} for a basis of {self._len} vectors")
        Ct = torch.as_tensor(C.T.copy(), device=self.device)
        rows = [self._row(j) for j in range(n)]
        chunk = max(1, min(chunk, self.dim))
        # float64 scratch reused by every slice: each slice is read once into X and written once from Y
        X = torch.empty(n, chunk, dtype=torch.float64, device=self.device)
        Y = torch.empty(p, chunk, dtype=torch.float64, device=self.device)
        for s in range(0, self.dim, chunk):
            e = min(s + chunk, self.dim)
            Xs, Ys = (X, Y) if e - s == chunk else (X[:, : e - s].contiguous(), Y[:, : e - s].contiguous())
            for j, r in enumerate(rows):
                Xs[j].copy_(r[s:e])
            torch.mm(Ct, Xs, out=Ys)
            for j in range(p):
                rows[j][s:e].copy_(Ys[j])
            self._released(s, e)
        self._len = p

    def lincomb(self, coeffs: np.ndarray | Sequence[float]) -> Tensor:
        """Σ_i c_i x_i over the first len(coeffs) vectors (a new vector)."""
        z = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        return self.subtract(-np.asarray(coeffs, dtype=np.float64), z, out=z)


def _sliced_sum(n: int, term: Callable[[int, int], Tensor]) -> float:
    """Σ over the slices [s, s + ``CHUNK``) of [0, n) of ``term(s, e)``, accumulated in float64 on one thread."""
    acc = torch.zeros((), dtype=torch.float64)
    with serial():
        for s in range(0, n, CHUNK):
            acc += term(s, min(s + CHUNK, n))
    return float(acc)


class TorchSpace:
    """Flat torch tensors on one device. Inner products are taken in float64.

    :meth:`new_basis` gives a preallocated :class:`Basis` in the working dtype, which :meth:`dots`,
    :meth:`lincomb` and :meth:`sub_lincomb` accept in place of a list of vectors (one matrix-vector pass per
    block instead of stacking the vectors).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)

    def dot(self, x: Tensor, y: Tensor) -> float:
        """xᵀy in float64; float32 (or lower) data on the CPU are converted a slice at a time (``CHUNK``, on one
        thread), never whole."""
        if (x.dtype == torch.float64 and y.dtype == torch.float64) or x.device.type != "cpu":
            return float(torch.dot(x.double(), y.double()))
        return _sliced_sum(x.numel(), lambda s, e: torch.dot(x[s:e].double(), y[s:e].double()))

    def axpy(self, a: float, x: Tensor, y: Tensor) -> Tensor:
        return torch.add(y, x, alpha=float(a))

    def scale(self, a: float, x: Tensor) -> Tensor:
        return x * float(a)

    def norm(self, x: Tensor) -> float:
        if x.dtype == torch.float64:
            return float(torch.linalg.vector_norm(x))
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def distance(self, x: Tensor, y: Tensor) -> float:
        """‖x − y‖, equal to :meth:`norm` of ``x - y``; on the CPU in lower precision without the temporary x − y
        (see :meth:`squared_distance_local`)."""
        if x.dtype == torch.float64 or x.device.type != "cpu":
            return self.norm(x - y)
        return float(np.sqrt(max(self.squared_distance_local(x, y), 0.0)))

    def squared_distance_local(self, x: Tensor, y: Tensor) -> float:
        """(x − y)ᵀ(x − y) as :meth:`dot` takes it (bitwise), of the vectors held here; on the CPU in lower precision
        the difference is formed a slice at a time."""
        if x.dtype == torch.float64 or x.device.type != "cpu":
            d = x - y
            return TorchSpace.dot(self, d, d)

        def term(s: int, e: int) -> Tensor:
            d = (x[s:e] - y[s:e]).double()
            return torch.dot(d, d)

        return _sliced_sum(x.numel(), term)

    def zeros(self) -> Tensor:
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def random(self, seed: int, kind: str = "rademacher") -> Tensor:
        return random_flat(self.dim, seed, kind, self.dtype).to(self.device)

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        return x * y

    def new_basis(self, capacity: int | None = None) -> Basis:
        """An empty :class:`Basis` for up to about ``capacity`` vectors (it grows beyond, a block at a time)."""
        return Basis(self.dim, self.dtype, self.device, capacity)

    def dots(self, xs: Sequence[Tensor] | Basis, y: Tensor) -> np.ndarray:
        if isinstance(xs, Basis):
            return xs.dots(y)
        if not xs:
            return np.zeros(0)
        return (torch.stack(list(xs)).double() @ y.double()).cpu().numpy()

    def lincomb(self, coeffs: np.ndarray, xs: Sequence[Tensor] | Basis) -> Tensor:
        if isinstance(xs, Basis):
            return xs.lincomb(coeffs)
        if len(xs) == 0:
            return self.zeros()
        c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64), device=self.device)
        return (c @ torch.stack(list(xs)).double()).to(self.dtype)

    def sub_lincomb(self, coeffs: np.ndarray, xs: Sequence[Tensor] | Basis, y: Tensor, out: Tensor | None = None
                    ) -> Tensor:
        """y − Σ_i c_i x_i, written into ``out`` when given (it may be y itself: an update in place, which with a
        :class:`Basis` needs no temporary vector) and returned."""
        if isinstance(xs, Basis):
            return xs.subtract(coeffs, y, out=out)
        combination = self.lincomb(coeffs, xs)
        if out is None:
            return self.axpy(-1.0, combination, y)
        return torch.add(y, combination, alpha=-1.0, out=out)  # axpy's numbers, written into out

    def to_tensor(self, x: Tensor) -> Tensor:
        return x

    def from_tensor(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype)
