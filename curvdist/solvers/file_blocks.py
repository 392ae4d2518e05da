"""Basis rows kept in files: blocks of a :class:`~curvdist.solvers.space.Basis` that live in the page cache, not in
the working memory of the process that uses them.

Each block is a shared mapping of a new file, unlinked at once: the kernel keeps the file while the mapping lives and
frees it with the tensor, so nothing is left behind, not even after a crash. Writes through a shared mapping go to
the file's pages in the page cache, which the kernel writes back to disk and may drop under memory pressure, reading
them again when they are used.

A mapped page that was touched stays in the process's page tables, so it counts in the process's resident size
until it is unmapped; a pass over a whole basis would bring every row in. :meth:`FileBlocks.release` drops the pages
of a range from the process's page tables (``madvise(MADV_DONTNEED)``, which on a shared file mapping keeps the
data: the next access maps the same page-cache page again, or reads it back from disk). :class:`Basis` calls it
after every slice of a pass, so a process holds about one slice of each row at a time (plus a row a product is
reading) instead of the whole basis.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import torch
from torch import Tensor

#: madvise advice that unmaps pages from the page tables and keeps a shared file mapping's data (None where the
#: platform has no madvise: release is then a no-op and the rows stay resident once touched)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class FileBlocks:
    """An ``allocate(rows, dim)`` for :class:`~curvdist.solvers.space.Basis` whose blocks are mapped from files in
    ``directory`` (module docstring), with :meth:`release` to drop a range of them from the resident memory."""

    def __init__(self, directory: str | os.PathLike[str], dtype: torch.dtype) -> None:
        self.directory, self.dtype = os.fspath(directory), dtype
        self._maps: list[tuple[int, int, mmap.mmap]] = []  # (first byte's address, length, mapping) per block

    def __call__(self, rows: int, dim: int) -> Tensor:
        nbytes = rows * dim * torch.empty((), dtype=self.dtype).element_size()
        fd, path = tempfile.mkstemp(dir=self.directory, suffix=".basis")
        try:
            os.unlink(path)
            os.ftruncate(fd, max(nbytes, 1))
            mapping = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        block = torch.frombuffer(mapping, dtype=self.dtype, count=rows * dim).view(rows, dim)  # keeps the mapping
        self._maps.append((block.data_ptr(), nbytes, mapping))
        return block

    def release(self, t: Tensor) -> None:
        """Drop the pages under ``t`` (a view of one of this allocator's blocks: a row range, or rows × a column
        range) from the process's page tables; the data stay in the file. Whole pages that ``t`` touches are
        dropped, so a neighbouring slice may have to map a shared page again."""
        if _DONTNEED is None or t.numel() == 0:
            return
        address = t.data_ptr()
        for base, nbytes, mapping in self._maps:
            if base <= address < base + nbytes:
                break
        else:
            raise ValueError("release: the tensor is not a view of a block of this allocator")
        size = t.element_size()
        if t.dim() == 1 or t.is_contiguous():
            spans = [(address - base, t.numel() * size)]
        else:
            row = t.stride(0) * size
            spans = [(address - base + r * row, t.shape[1] * size) for r in range(t.shape[0])]
        page = mmap.PAGESIZE
        for start, length in spans:
            lo = start // page * page
            hi = min(-(-(start + length) // page) * page, nbytes)
            if hi > lo:
                mapping.madvise(_DONTNEED, lo, hi - lo)


def file_block(directory: str | os.PathLike[str], dtype: torch.dtype) -> FileBlocks:
    """An ``allocate`` for :class:`~curvdist.solvers.space.Basis` that keeps the rows out of the process's working
    memory: blocks mapped from files in ``directory`` (:class:`FileBlocks`)."""
    return FileBlocks(directory, dtype)
