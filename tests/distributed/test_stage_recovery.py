"""Pipeline vectors at speed, and stages killed mid-solve: the fused Lanczos step equals the step-by-step vector
operations bit for bit, vector operations submitted without waiting give the local numbers and raise their errors at
the next wait, snapshots every K products give the numbers of snapshots at every product, and a stage killed
between calls (``ray.kill``) is recovered from its last snapshot and the log replayed on it, to the numbers of the
uninterrupted run (a stage lost in the middle of a product: test_stage_faults.py)."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.distributed import shard_store
from curvdist.distributed.cluster import ClusterError
from curvdist.distributed.pipeline import PipelineOperator, StagePool
from curvdist.distributed.shard_store import ShardStore
from curvdist.distributed.sharded_space import ShardedVector
from curvdist.problem.spec import ProblemSpec
from curvdist.solvers.lanczos import lanczos

MICRO = 2
SPEC = ProblemSpec(model_factory="curvdist.zoo:mlp",
                   model_kwargs={"in_features": 64, "hidden": [5, 4], "out_features": 10, "seed": 1},
                   data_factory="curvdist.zoo:digits", data_kwargs={"n": 60, "dtype": "float64"},
                   batch_size=30, loss="cross_entropy")


class _Unfused:
    """The sharded space without its fused ``expand``: Lanczos takes the step-by-step path."""

    def __init__(self, space: Any) -> None:
        self.space = space

    def __getattr__(self, name: str) -> Any:
        if name == "expand":
            raise AttributeError(name)
        return getattr(self.space, name)


class _KillAfter(PipelineOperator):
    """Kills stage 1 (Ray restarts it) right after the n-th product, so the next vector operations find it lost."""

    def __init__(self, pool: StagePool, kind: str, n: int) -> None:
        super().__init__(pool, kind)
        self.n, self.count = n, 0

    def apply_vector(self, v: Any) -> Any:
        out = super().apply_vector(v)
        self.count += 1
        if self.count == self.n:
            self.pool.ray.kill(self.pool.actors[1], no_restart=False)
        return out


def _solve(pool: StagePool, op: PipelineOperator | None = None) -> list[float]:
    op = op or PipelineOperator(pool, "ggn")
    eig = cd.eigs(op, k=2, tol=1e-10)
    tr = cd.trace(PipelineOperator(pool, "ggn"), method="hutchpp", matvecs=6, seed=1)
    return [*eig.value, eig.matvecs, tr.value]


def _pool(every: int) -> StagePool:
    return StagePool(SPEC, 2, micro_batches=MICRO, snapshot_every=every)


@pytest.fixture(scope="module")
def pool1(ray_module) -> Iterator[StagePool]:
    """Two stages, snapshots at every product, shared by the tests that kill nothing."""
    pool = _pool(1)
    yield pool
    pool.shutdown()


def test_fused_lanczos_step_equals_the_step_by_step_operations(pool1):
    op = PipelineOperator(pool1, "ggn")
    space = pool1.space
    runs = []
    for s in (space, _Unfused(space)):
        state = lanczos(op.apply_vector, s, space.random(5, "gaussian"), 12)
        runs.append((state.alphas, state.betas))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]  # bitwise
    local = cd.operator(SPEC.build(), "ggn")
    ref = lanczos(local.apply_vector, local.vector_space(), local.vector_space().random(5, "gaussian"), 12)
    for got, want in zip(runs[0], (ref.alphas, ref.betas)):  # and the local recurrence to rounding
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * max(map(abs, want)))
    # thick restarts rotate the stage-held bases in place, to the local restarted values
    staged = cd.eigs(op, k=2, tol=1e-10, max_basis=6, maxiter=500)
    here = cd.eigs(local, k=2, tol=1e-10, max_basis=6, maxiter=500)
    assert staged.converged and staged.matvecs > 6
    np.testing.assert_allclose(staged.value, here.value, rtol=1e-9)


def test_vector_operations_run_without_waiting_and_their_errors_reach_the_next_wait(pool1):
    """Operations that make or change shards (axpy, lincomb, ...) are submitted without a round trip: the calls wait
    at the next operation that returns numbers (a dot), which gives the local numbers. An error in a submitted call
    is raised there, as itself, and the space works on after it."""
    space = pool1.space
    local = cd.operator(SPEC.build(), "ggn").vector_space()
    space.settle()
    v, w = space.random(1, "gaussian"), space.random(2, "gaussian")
    lv, lw = local.random(1, "gaussian"), local.random(2, "gaussian")
    u = space.lincomb(np.array([2.0, -1.0]), [space.axpy(0.5, v, w), v])
    assert len(space._pending) == 2 * 4  # two randoms, an axpy and a lincomb on each of the two stages
    want = float(torch.dot(2.0 * (0.5 * lv + lw) - lv, lv))
    assert space.dot(u, v) == pytest.approx(want, rel=1e-12)
    assert space._pending == []
    unknown = ShardedVector(space, 10**9)  # a handle no stage holds
    space.axpy(1.0, unknown, v)  # submitted: no error yet
    with pytest.raises(cd.SolverError, match="vector 1000000000 has no value on this stage"):
        space.dot(v, v)
    assert space._pending == []
    assert space.dot(u, v) == pytest.approx(want, rel=1e-12)


def test_snapshots_every_k_products_and_a_stage_killed_between_calls(pool1):
    """Snapshots every 3 products give the numbers of snapshots at every product (the shared pool), from fewer
    snapshots; stage 1 killed right after the 5th product is recovered by the next vector operation: Ray restarts
    it, it loads the snapshot taken at the 4th product, and the 4th and 5th products and the operations after them
    are replayed. The killed run keeps its Lanczos rows in memory-mapped, already unlinked files (``basis_on_disk``;
    the restarted stage loads them into a new file-backed basis): the same numbers, and no file left behind."""
    assert pool1.basis_dir is None
    start = pool1.space.epoch
    clean, epochs = {1: _solve(pool1)}, {1: pool1.space.epoch - start}  # snapshots taken
    pool = StagePool(SPEC, 2, micro_batches=MICRO, snapshot_every=3, basis_on_disk=True)
    try:
        start = pool.space.epoch
        clean[3] = _solve(pool, _KillAfter(pool, "ggn", 5))
        epochs[3] = pool.space.epoch - start  # snapshots taken
        assert pool.space.recoveries == 1 and pool.space.replayed_products == 2
        basis_dir = pool.basis_dir
        assert sorted(os.listdir(basis_dir)) == ["stage0", "stage1"]
        assert all(os.listdir(os.path.join(basis_dir, d)) == [] for d in ("stage0", "stage1"))
    finally:
        pool.shutdown()
    assert clean[3] == clean[1]  # bitwise
    assert epochs[3] < epochs[1] / 2
    assert not os.path.exists(basis_dir)


class _Store(ShardStore):
    """A stage's shard store alone (no actor): 1,000 float32 coordinates, snapshots in ``snapshots``."""

    def __init__(self, snapshots: Path, dtype: torch.dtype = torch.float32) -> None:
        self.dim, self.dtype, self.device = 1000, dtype, torch.device("cpu")
        self.total, self.segments = 1000, [(0, 1000)]
        self._open_store(snapshots)


def test_a_discarded_vector_is_snapshotted_as_a_marker_and_restored_as_nan(tmp_path):
    """A vector declared dead (its value is written before it is read again) lets go of its memory until written
    (a read raises, naming it) and costs its snapshot a marker, not its data; a stage restarted from that snapshot
    holds NaN there (a read before a write shows), and once the vector is written again the next snapshot holds its
    data and no marker."""
    store = _Store(tmp_path)
    store.put(1, torch.arange(1000, dtype=torch.float32))
    store._snapshot(0)
    held = weakref.ref(store.vectors[1].untyped_storage())
    store.discard([1])
    assert held() is None  # the memory is let go
    with pytest.raises(cd.SolverError, match="vector 1 has no value on this stage"):
        store.dot(1, 1)
    store._snapshot(1)
    assert (tmp_path / "d1.pt").is_file()
    restarted = _Store(tmp_path)
    restarted._load_snapshot()
    assert restarted.epoch == 1 and torch.isnan(restarted.vectors[1]).all()
    assert np.isnan(restarted.dot(1, 1))
    store.basis_new(0, 2)
    store.put(2, torch.ones(1000))
    store.basis_append(0, 2, 1.0)
    store.basis_subtract((0, 1, True), [2.0], 2, 1)  # vectors[1] = 1 − 2·1, written in place of the dead value
    store._snapshot(2)
    assert not (tmp_path / "d1.pt").exists() and (tmp_path / "v1.npy").is_file()
    again = _Store(tmp_path)
    again._load_snapshot()
    assert torch.equal(again.vectors[1], torch.full((1000,), -1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_snapshot_restores_vectors_and_basis_rows_bit_for_bit_in_the_stage_dtype(tmp_path, dtype):
    """Vectors and basis rows go to ``.npy`` files as their bytes (bfloat16 as its 16-bit pattern) and come back
    bit for bit, in the stage's dtype; a row is written from its view of the basis block, only its own entries."""
    g = torch.Generator().manual_seed(0)
    store = _Store(tmp_path, dtype)
    store.put(1, torch.randn(1000, generator=g).to(dtype))
    store.basis_new(0, 4)
    for vid in (2, 3):
        store.put(vid, torch.randn(1000, generator=g).to(dtype))
        store.basis_append(0, vid, 1.0)
    store._snapshot(0)
    assert (tmp_path / "b0_1.npy").stat().st_size < 1000 * 8 + 200  # one row, not the block of 4
    again = _Store(tmp_path, dtype)
    again._load_snapshot()
    assert again.vectors[1].dtype == dtype and again.bases[0][1].dtype == dtype
    for a, b in ((again.vectors[1], store.vectors[1]), (again.bases[0][0], store.bases[0][0]),
                 (again.bases[0][1], store.bases[0][1])):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _slow_saves(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every snapshot file takes ``seconds`` longer to write (the writer thread is still busy when the next call
    comes)."""
    save = shard_store._save

    def slow(path: Path, obj: Any) -> None:
        time.sleep(seconds)
        save(path, obj)

    monkeypatch.setattr(shard_store, "_save", slow)


def test_a_snapshot_written_in_the_background_holds_the_values_of_its_start(tmp_path, monkeypatch):
    """A product's snapshot is written on the store's writer thread while the passes compute: the calls that write
    into a tensor it holds (an in-place basis subtraction, a thick restart's rotation) wait for it, so the snapshot
    holds the values at its start, and a stage restarted from it gets those, not the values written after."""
    _slow_saves(monkeypatch, 0.2)
    store = _Store(tmp_path)
    store.put(1, torch.arange(1000, dtype=torch.float32))
    store.basis_new(0, 3)
    store.put(2, torch.ones(1000))
    store.basis_append(0, 2, 1.0)
    store._snapshot(0, background=True)
    assert store._writing is not None and not store._writing.done()
    store.basis_subtract((0, 1, True), [5.0], 1, 1)  # vectors[1] −= 5·row 0, in place
    store.basis_rotate(0, [[2.0]])  # row 0 ← 2·row 0, in place
    store._settle_writes()
    assert store.snapshot_wait_s > 0
    restarted = _Store(tmp_path)
    restarted._load_snapshot()
    assert restarted.epoch == 0
    assert torch.equal(restarted.vectors[1], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(restarted.bases[0][0], torch.ones(1000))
    assert torch.equal(store.vectors[1], torch.arange(1000, dtype=torch.float32) - 5)  # the live values moved on
    assert torch.equal(store.bases[0][0], torch.full((1000,), 2.0))


def test_a_stage_that_dies_while_writing_a_snapshot_comes_back_with_the_previous_one_whole(tmp_path, monkeypatch):
    """Snapshot 1 stops after its first file (the stage died, or the disk refused): the files of snapshot 0 are
    all still there — the rewritten vector went to a new file, the freed one's file was not deleted — so a
    restarted stage loads snapshot 0 as it was; the store refuses every later snapshot with an error naming the
    directory, and the snapshot written after a successful one deletes the files only the previous one held."""
    store = _Store(tmp_path)
    store.put(1, torch.full((1000,), 1.0))
    store.put(2, torch.full((1000,), 2.0))
    store._snapshot(0)
    store.sub_lincomb(1, [1.0], [2], 1)  # vectors[1] = 1 − 2, in place: rewritten
    store.free([2])
    store.put(3, torch.full((1000,), 3.0))
    save, calls = shard_store._save, []

    def dies_after_one(path: Path, obj: Any) -> None:
        calls.append(path.name)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        save(path, obj)

    monkeypatch.setattr(shard_store, "_save", dies_after_one)
    store._snapshot(1, background=True)
    with pytest.raises(ClusterError, match=f"stage snapshot 1 could not be written to {tmp_path}.*No space"):
        store._settle_writes()
    assert calls[0] == "v1.1.npy"  # not v1.npy, snapshot 0's file of vector 1
    restarted = _Store(tmp_path)
    restarted._load_snapshot()
    assert restarted.epoch == 0 and sorted(restarted.vectors) == [1, 2]
    assert torch.equal(restarted.vectors[1], torch.full((1000,), 1.0))
    assert torch.equal(restarted.vectors[2], torch.full((1000,), 2.0))
    with pytest.raises(ClusterError, match="stage snapshot 1 could not be written"):
        store._snapshot(2)
    monkeypatch.setattr(shard_store, "_save", save)
    fresh = _Store(tmp_path / "fresh")
    fresh.put(1, torch.zeros(1000))
    fresh.put(2, torch.ones(1000))
    fresh._snapshot(0)
    fresh.sub_lincomb(1, [1.0], [2], 1)
    fresh.free([2])
    fresh._snapshot(1)
    assert sorted(os.listdir(tmp_path / "fresh")) == ["epoch.pt", "v1.1.npy"]
    again = _Store(tmp_path / "fresh")
    again._load_snapshot()
    assert again.epoch == 1 and sorted(again.vectors) == [1]
    assert torch.equal(again.vectors[1], -torch.ones(1000))


def test_sub_lincomb_on_a_stage_gives_lincomb_then_axpy_in_place(tmp_path, monkeypatch):
    """y − Σ c_i x_i as one stage call (Hutch++'s residual probe): the numbers of ``lincomb`` then ``axpy(-1)`` bit
    for bit, over chunks with a ragged tail; in place it writes into y's own memory (no vector beside it), and a y
    that is a view of a basis row gets a new tensor instead (the row is not written)."""
    monkeypatch.setattr(shard_store, "DOT_CHUNK", 256)
    g = torch.Generator().manual_seed(0)
    store = _Store(tmp_path)
    for i in (1, 2, 3):
        store.put(i, torch.randn(1000, generator=g))
    c = [0.3, -1.7]
    store.lincomb(10, c, [1, 2])
    store.axpy(11, -1.0, 10, 3)
    store.sub_lincomb(12, c, [1, 2], 3)
    assert torch.equal(store.vectors[12], store.vectors[11])
    memory = store.vectors[3].data_ptr()
    store.sub_lincomb(3, c, [1, 2], 3)
    assert torch.equal(store.vectors[3], store.vectors[11]) and store.vectors[3].data_ptr() == memory
    store.basis_new(0, 1)
    store.basis_append(0, 1, 1.0)
    store.basis_row(0, 0, 4)
    store.sub_lincomb(4, [1.0], [2], 4)
    assert torch.equal(store.vectors[4], store.vectors[1] - store.vectors[2])
    assert torch.equal(store.bases[0][0], store.vectors[1])


def test_lanczos_on_the_stages_snapshots_its_work_vector_as_a_marker(pool1):
    """A pipelined Lanczos run with a snapshot at every product writes, per step, the new basis row but not the work
    vector it was copied from (dead once it is in the basis): from the second product on, each stage's snapshot
    holds one marker and no data file of the work vector."""
    space = pool1.space
    op = PipelineOperator(pool1, "ggn")
    seen: list[list[list[str]]] = []

    def apply(v: Any) -> Any:
        out = op.apply_vector(v)  # its snapshot was written at its start
        seen.append([os.listdir(os.path.join(pool1.snapshot_dir, f"stage{s}")) for s in (0, 1)])
        return out

    lanczos(apply, space, space.random(3, "gaussian"), 5)
    assert len(seen) == 5
    for files in (f for product in seen[1:] for f in product):
        markers = [f for f in files if f.startswith("d")]
        assert len(markers) == 1, files
        vid = markers[0][1:].split(".")[0]
        assert not [f for f in files if f.split(".")[0] == "v" + vid], files
        assert [f for f in files if f.startswith("b") and f.endswith(".npy")], files  # the rows' data
