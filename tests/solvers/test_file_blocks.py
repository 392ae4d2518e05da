"""Basis rows in files (FileBlocks): the same numbers as rows in memory, and out of the resident memory after every
pass over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curvdist.solvers import space
from curvdist.solvers.file_blocks import FileBlocks, file_block
from curvdist.solvers.space import Basis

SMAPS = Path("/proc/self/smaps")


def _resident_kb(t: torch.Tensor) -> int:
    """The resident size (kB) of the mapping that holds t's first element, as the kernel reports it."""
    address, inside = t.data_ptr(), False
    for line in SMAPS.read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError("no mapping holds the tensor")


def _pair(d: int, dtype: torch.dtype, tmp_path: Path, rows: int = 7, release: bool = True) -> tuple[Basis, Basis]:
    """The same rows (0.5 · seeded Gaussians) in a Basis in memory and in one whose blocks are FileBlocks."""
    g = torch.Generator().manual_seed(1)
    blocks = FileBlocks(tmp_path, dtype)
    allocate = blocks if release else (lambda r, n: blocks(r, n))  # a plain callable: no release
    memory, files = Basis(d, dtype, block_rows=3), Basis(d, dtype, block_rows=3, allocate=allocate)
    for x in torch.randn(rows, d, generator=g, dtype=dtype):
        memory.append(x, 0.5)
        files.append(x, 0.5)
    return memory, files


def test_basis_rows_in_files_equal_rows_in_memory(tmp_path):
    """file_block: blocks mapped from files (unlinked at once, so the directory stays empty) hold the same rows and
    give the same products, bit for bit, as blocks in memory."""
    d, dtype = 50, torch.float64
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(7, d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    memory, files = Basis(d, dtype, block_rows=3), Basis(d, dtype, block_rows=3, allocate=file_block(tmp_path, dtype))
    for x in X:
        memory.append(x, 0.5)
        files.append(x, 0.5)
    assert [b.shape for b in files._blocks] == [b.shape for b in memory._blocks]
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(torch.stack(list(files)), torch.stack(list(memory)))
    assert np.array_equal(files.dots(y), memory.dots(y))
    c = np.linspace(-1.0, 1.0, 7)
    assert torch.equal(files.subtract(c, y), memory.subtract(c, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_passes_in_slices_give_the_numbers_of_whole_rows(monkeypatch, tmp_path, dtype):
    """Rows that can be released are passed over 4,096 coordinates at a time (d = 10,007: a ragged last slice).
    Appends, subtractions (new and in place), combinations and a rotation are elementwise over the rows, so they
    equal the whole-row passes bit for bit; float32's precise dots take the same blocked summation either way. Dots
    that are one reduction over the whole row (float64, and float32's coarse dots) are summed slice by slice, so they
    may round differently: within 1e-14 of Σ|x_i y_i| (float64) and 1e-6 (float32's coarse product, whose own error
    is about √d·ε₃₂ ≈ 6e-6)."""
    monkeypatch.setattr(space, "RELEASE_SLICE", 1 << 12)
    d = 10_007
    memory, files = _pair(d, dtype, tmp_path)
    assert len(files._spans()) == 3 and files._spans()[-1] == (8192, d) and memory._spans() == [(0, d)]
    y = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=dtype)
    assert torch.equal(torch.stack(list(files)), torch.stack(list(memory)))
    c = np.linspace(-1.0, 1.0, 7)
    assert torch.equal(files.subtract(c, y), memory.subtract(c, y))
    assert torch.equal(files.subtract(c[:4], y.clone(), out=None), memory.subtract(c[:4], y.clone()))
    y1, y2 = y.clone(), y.clone()
    files.subtract(c, y1, out=y1)
    memory.subtract(c, y2, out=y2)
    assert torch.equal(y1, y2)
    assert torch.equal(files.lincomb(c), memory.lincomb(c))
    scale = (torch.stack(list(memory)).double().abs() @ y.double().abs()).numpy()
    if dtype == torch.float32:
        assert np.array_equal(files.dots(y), memory.dots(y))
        assert np.all(np.abs(files.coarse().dots(y) - memory.coarse().dots(y)) <= 1e-6 * scale)
    else:
        assert np.all(np.abs(files.dots(y) - memory.dots(y)) <= 1e-14 * scale)
    C = np.random.default_rng(0).standard_normal((7, 3))
    files.rotate_(C)
    memory.rotate_(C)
    assert torch.equal(torch.stack(list(files)), torch.stack(list(memory)))


@pytest.mark.skipif(not SMAPS.exists(), reason="the resident size of a mapping is read from Linux's /proc/self/smaps")
def test_rows_leave_the_resident_memory_after_every_pass(monkeypatch, tmp_path):
    """Six float32 rows of 2²⁰ coordinates (24 MB in two blocks): after each append, dots, subtraction and the
    rotation, no page of the file blocks is resident, slice by slice as the pass goes. A row read outside a pass (a
    product's input) is resident until the next pass releases it. Without ``release`` every row written stays
    resident: the whole basis."""
    monkeypatch.setattr(space, "RELEASE_SLICE", 1 << 16)
    d = 1 << 20
    _, files = _pair(d, torch.float32, tmp_path, rows=6)
    resident = lambda b: sum(_resident_kb(blk) for blk in b._blocks)  # noqa: E731
    assert len(files._blocks) == 2 and resident(files) == 0
    y = torch.randn(d, generator=torch.Generator().manual_seed(2))
    files.dots(y)
    files.coarse().dots(y)
    assert resident(files) == 0
    out = files.subtract(np.ones(6), y)
    files.subtract(np.ones(6), out, out=out)
    assert resident(files) == 0
    float(files[4].sum())  # a product reads its input row whole
    assert resident(files) >= 4 * d // 1024
    files.dots(y)
    assert resident(files) == 0
    files.rotate_(np.eye(6)[:, :3])
    assert resident(files) == 0

    _, kept = _pair(d, torch.float32, tmp_path, rows=6, release=False)
    kept.dots(y)
    assert resident(kept) >= 6 * 4 * d // 1024
