"""Orthonormalization of a few vectors in a :class:`VectorSpace` (Gram-Schmidt, applied twice)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .space import Vector, VectorSpace


def orthonormalize(
    space: VectorSpace, vectors: Sequence[Vector], rtol: float = 1e-10
) -> tuple[list[Vector], np.ndarray, list[int]]:
    """Thin QR  Y = Q R  of the columns Y = [y_1 … y_m] by classical Gram-Schmidt with reorthogonalization.

    Returns (Q, R, kept): columns that are numerically dependent (remaining norm ≤ ``rtol`` · largest input norm)
    are dropped from Q; R is (len(Q) × m) with Y ≈ Q R; ``kept`` lists the indices of the columns that
    contributed a basis vector.
    """
    Q: list[Vector] = []
    m = len(vectors)
    R = np.zeros((m, m))
    kept: list[int] = []
    scale = max((space.norm(y) for y in vectors), default=0.0)
    for j, y in enumerate(vectors):
        w = y
        for _ in range(2 if Q else 0):  # nothing to subtract yet: no zero vector and no copy of y
            c = space.dots(Q, w)
            R[: len(Q), j] += c
            w = space.axpy(-1.0, space.lincomb(c, Q), w)
        r = space.norm(w)
        if r > rtol * scale and r > 0:
            R[len(Q), j] = r
            Q.append(space.scale(1.0 / r, w))
            kept.append(j)
    return Q, R[: len(Q)], kept
