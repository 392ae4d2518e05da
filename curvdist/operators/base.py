"""Matrix-free curvature operators: the common machinery.

An operator C is a symmetric d×d matrix over the selected parameters of a :class:`~curvdist.problem.Problem`,
accumulated over the whole data set with the problem's reduction s (1/N or 1):

    C v = s · Σ_batches C_batch v.

Vectors are flat tensors of length d, or parameter-shaped (a sequence in ``problem.param_names`` order, or a
name→tensor dict); a product returns the same form it was given.

Blocks of vectors. C V = [C v₁ … C v_k] for a (d, k) matrix V (:meth:`CurvatureOperator.apply_block`, ``op @ V``)
is computed in one pass per batch rather than k: the per-batch product is vectorized over the k directions with
``torch.func.vmap``, so everything that does not depend on v (the forward pass; for the Hessian also the first
backward) is computed once per batch and the v-dependent passes run on k stacked tangents or cotangents
(:meth:`CurvatureOperator.matmat_params`). Each column equals the single product C v_i up to rounding (the same
operations, batched). Where ``vmap`` cannot run the product (an op without a batching rule) the block falls back
to a loop of single products, for good (:attr:`CurvatureOperator.block_vectorized` turns False).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..errors import (
    CurvdistError,
    NonDeterministicError,
    NonFiniteError,
    ShapeError,
    SolverError,
    failures_inside_torch,
)
from ..finite import all_finite
from ..problem.data import Batch, Inputs, shuffles
from ..problem.problem import Params, Problem

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

VectorLike = Tensor | Sequence[Tensor] | Mapping[str, Tensor]

DENSE_LIMIT = 8192


def relative_difference(a: Params, b: Params) -> float:
    """‖a − b‖ / ‖a‖ over parameter-shaped tensors, summed in float64 a tensor at a time (no flat copies)."""
    num = math.sqrt(sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b)))
    den = max(math.sqrt(sum(float(x.double().pow(2).sum()) for x in a)), 1e-300)
    return num / den


def add_parts(acc: list[Tensor] | None, parts: Params, dtype: torch.dtype) -> list[Tensor]:
    """``acc`` + ``parts`` in place, in ``dtype``; with ``acc`` None the parts (fresh tensors) become the accumulator —
    cast, or copied where they are not contiguous (an expanded autograd result, stride 0, cannot be added into)."""
    if acc is None:
        return [p.to(dtype) if p.is_contiguous() else p.to(dtype, copy=True) for p in parts]
    for a, p in zip(acc, parts):
        a.add_(p.to(a.dtype))
    return acc


class CurvatureOperator(ABC):
    """A symmetric curvature matrix applied matrix-free with ``torch.func``.

    Subclasses implement :meth:`batch_matvec`, the unscaled sum over one batch. Construction runs a
    determinism check (two products with the same vector must agree) unless ``check_determinism=False``.
    """

    kind: str = "curvature"
    backend: str = "local"

    def __init__(self, problem: Problem, check_determinism: bool = True) -> None:
        self.problem = problem
        self.dim = problem.dim
        #: the dtype of the operator's vectors and sums: the problem's ``accumulate_dtype`` (float32 at least for
        #: bfloat16/float16 models, whose per-batch products run in the model's dtype)
        self.dtype = problem.accumulate_dtype
        self.device = problem.device
        if check_determinism:
            self.check_determinism()

    # ----------------------------------------------------------- to implement
    @abstractmethod
    def batch_matvec(self, params: Params, v: Params, X: Inputs, y: Tensor, ctx: Any) -> Params:
        """Σ_{n in batch} C_n v, unscaled, as parameter-shaped tensors; ``ctx`` is :meth:`batch_context`'s."""

    def batch_context(self, params: Params, X: Inputs, y: Tensor, batch_index: int) -> Any:
        """Per-batch data that does not depend on v (e.g. sampled labels), computed once outside ``vmap``."""
        return None

    # ----------------------------------------------------------- products
    def matvec_params(self, v: Params) -> Params:
        """C v for parameter-shaped v (no validation): the accumulation over batches and the scaling."""
        return self._accumulate(v, self.batch_matvec)

    def matmat_params(self, V: Params) -> Params:
        """C V for a block of vectors stacked along a leading axis, vectorized with ``torch.func.vmap``.

        ``V[j]`` has shape (k, *shape of parameter j); per batch, ``vmap`` of :meth:`batch_matvec` over the k
        directions (the v-independent work once, the v-dependent passes on k stacked tangents/cotangents). If vmap
        fails on the model (RuntimeError/NotImplementedError: a missing batching rule), this and every later block
        product is a loop of :meth:`batch_matvec` instead.
        """

        def block(p: Params, v: Params, X: Inputs, y: Tensor, c: Any) -> Params:
            if self.block_vectorized:
                try:
                    return vmap(lambda u: self.batch_matvec(p, u, X, y, c))(v)
                except CurvdistError:
                    raise
                except (RuntimeError, NotImplementedError):
                    self.block_vectorized = False
            cols = [self.batch_matvec(p, tuple(t[i] for t in v), X, y, c) for i in range(v[0].shape[0])]
            return tuple(torch.stack([col[j] for col in cols]) for j in range(len(v)))

        return self._accumulate(V, block)

    #: whether block products are vectorized (``vmap``); False after vmap failed on this model (then a loop)
    block_vectorized: bool = True

    #: whether :meth:`batch_matvec`'s results are fresh tensors that nothing else references: then the first batch's
    #: result is the accumulator where it is contiguous (one parameter-sized buffer less; 0 + x = x, so the sums
    #: are the same; an expanded autograd result, stride 0, is copied)
    fresh_parts: bool = False

    def product_batches(self) -> Iterator[Batch]:
        """The (micro-)batches one product sums over: the problem's."""
        return self.problem.batches()

    def _accumulate(self, v: Params, product: Any) -> Params:
        params = self.problem.params
        acc: list[Tensor] | None = None if self.fresh_parts else [torch.zeros_like(t, dtype=self.dtype) for t in v]
        v = tuple(t.to(self.problem.dtype) for t in v)
        for b, (X, y) in enumerate(self.product_batches()):
            with failures_inside_torch(f"the {self.kind} product", f" on batch {b}",
                                       "the model's forward pass must be a pure function of its parameters (no "
                                       "in-place updates of module state) built from ops with forward- and "
                                       "reverse-mode derivatives"):
                ctx = self.batch_context(params, X, y, b)
                parts = product(params, v, X, y, ctx)
            acc = add_parts(acc, parts, self.dtype)
            del parts  # not held while the next batch's product runs
        if acc is None:  # no batches (a problem always has one; kept for operators over other data)
            acc = [torch.zeros_like(t, dtype=self.dtype) for t in v]
        s = self.problem.scale
        return tuple(a.mul_(s) for a in acc)

    def matvec(self, v: VectorLike) -> Any:
        """C v, returned in the form v was given (flat tensor, sequence or dict of parameter-shaped tensors)."""
        if isinstance(v, Tensor):
            if v.ndim != 1 or v.numel() != self.dim:
                raise ShapeError(
                    f"{self.kind} operator acts on vectors of length {self.dim}, got shape {tuple(v.shape)}"
                )
            out = self.problem.flatten(self.matvec_params(self.problem.unflatten(self._cast(v))))
        else:
            flat = self.problem.flatten(v)  # validates shapes
            parts = self.matvec_params(self.problem.unflatten(self._cast(flat)))
            out = parts if not isinstance(v, Mapping) else dict(zip(self.problem.param_names, parts))
        tensors = [out] if isinstance(out, Tensor) else list(out.values() if isinstance(out, dict) else out)
        if not all(all_finite(t) for t in tensors):
            raise NonFiniteError(f"the {self.kind} product is NaN or inf (check the data and the parameters)")
        return out

    def vector_space(self) -> Any:
        """The vector space solvers use for this operator (flat tensors on the parameters' device)."""
        from ..solvers.space import TorchSpace

        return TorchSpace(self.dim, self.dtype, self.device)

    def apply_vector(self, v: Tensor) -> Tensor:
        """C v for a flat vector of :meth:`vector_space` (no validation; the solvers' entry point)."""
        return self.problem.flatten(self.matvec_params(self.problem.unflatten(v)))

    def apply_block(self, V: Tensor, chunk: int | None = None) -> Tensor:
        """C V = [C v₁ … C v_k] for a (d, k) matrix V, in one batched pass per data batch (see the module docstring).

        Every column equals :meth:`matvec` of that column up to rounding. ``V`` may have any real floating dtype
        and device; it is cast to the operator's (:attr:`dtype`, :attr:`device`), as :meth:`matvec` casts a vector,
        and the result is a (d, k) tensor of the operator's dtype. ``chunk``: at most this many columns per
        batched pass (the v-dependent activations of a pass grow with the number of columns; default: all k).

        Raises:
            ShapeError: V is not a 2-D tensor of shape (d, k) with k ≥ 1 (a (k, d) block must be transposed), its
                dtype is not a real floating dtype, or ``chunk`` is not a positive integer.
            NonFiniteError: the product is NaN or inf.
        """
        if not isinstance(V, Tensor):
            raise ShapeError(f"apply_block() needs a torch.Tensor of shape ({self.dim}, k), got {type(V).__name__}")
        if V.ndim != 2 or V.shape[0] != self.dim or V.shape[1] < 1:
            hint = " (a block of k row vectors must be transposed: pass V.T)" if (
                V.ndim == 2 and V.shape[1] == self.dim and V.shape[0] >= 1) else ""
            raise ShapeError(f"the {self.kind} operator's apply_block() needs a matrix of shape ({self.dim}, k) "
                             f"with k >= 1 columns, got shape {tuple(V.shape)}{hint}")
        if not V.dtype.is_floating_point:
            raise ShapeError(f"the {self.kind} operator's apply_block() needs a real floating-point matrix, got "
                             f"dtype {V.dtype}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ShapeError(f"chunk must be a positive integer or None, got {chunk!r}")
        rows = self._cast(V).T  # (k, d), a view when V already has the operator's dtype and device
        out = self._block(rows.shape[0], lambda a, b, o, n: rows[a:b, o:o + n], chunk).T
        if not all_finite(out):
            raise NonFiniteError(f"the {self.kind} product is NaN or inf (check the data and the parameters)")
        return out

    def apply_vectors(self, vectors: Sequence[Tensor], chunk: int | None = None) -> list[Tensor]:
        """[C x₁, …, C x_k] for flat vectors of :meth:`vector_space` (no validation; the block analogue of
        :meth:`apply_vector` for solvers), computed as one block product (``chunk`` columns per pass at most)."""
        if len(vectors) == 0:
            return []

        def piece(a: int, b: int, o: int, n: int) -> Tensor:
            return torch.stack([x[o:o + n] for x in vectors[a:b]]).to(self.device, self.dtype)

        return list(self._block(len(vectors), piece, chunk).unbind(0))

    def _block(self, k: int, piece: Any, chunk: int | None) -> Tensor:
        """C applied to k vectors, ``chunk`` at a time (default all) per :meth:`matmat_params` call; returns (k, d).

        ``piece(a, b, o, n)`` gives the entries [o, o + n) of vectors a … b−1 as a (b − a, n) tensor: each parameter's
        block of k directions is copied once, straight from the caller's vectors, and each result once into the
        (k, d) output."""
        step = k if chunk is None else min(chunk, k)
        out = torch.empty(k, self.dim, dtype=self.dtype, device=self.device)
        for a in range(0, k, step):
            b = min(a + step, k)
            offsets, stacked, o = [], [], 0
            for s in self.problem.shapes:
                n = s.numel()
                stacked.append(piece(a, b, o, n).reshape(b - a, *s))
                offsets.append((o, n))
                o += n
            CV = self._block_params(tuple(stacked))
            del stacked
            for (o, n), t in zip(offsets, CV):
                out[a:b, o:o + n].copy_(t.reshape(b - a, n))
        return out

    def _block_params(self, V: Params) -> Params:
        """The block product behind :meth:`apply_block` and :meth:`apply_vectors`: :meth:`matmat_params`."""
        return self.matmat_params(V)

    def __matmul__(self, v: VectorLike) -> Any:
        """``op @ v``: :meth:`matvec` for a vector, :meth:`apply_block` for a 2-D tensor of shape (d, k)."""
        if isinstance(v, Tensor) and v.ndim == 2:
            return self.apply_block(v)
        return self.matvec(v)

    def _cast(self, flat: Tensor) -> Tensor:
        return flat.to(device=self.device, dtype=self.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    # ----------------------------------------------------------- checks
    def check_determinism(self, seed: int = 0) -> None:
        """Apply C twice to one random vector; raise :class:`NonDeterministicError` when the results differ."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.dim, generator=g, dtype=torch.float64).to(self.device, self.dtype)
        v = self.problem.unflatten(v)
        a = self.matvec_params(v)  # parameter-shaped: no flat copies beside the two products
        b = self.matvec_params(v)
        tol = 1e-10 if self.dtype == torch.float64 else 1e-4
        diff = relative_difference(a, b)
        if not diff <= tol:  # also catches NaN
            raise NonDeterministicError(
                f"two identical {self.kind}-vector products differ (relative difference {diff:.2e} > {tol:.0e}); "
                f"the loss is not a fixed function of the parameters. Likely cause: {self._likely_causes()}"
            )

    def _likely_causes(self) -> str:
        causes = []
        for name, m in self.problem.model.named_modules():
            label = name or type(m).__name__
            if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                causes.append(f"dropout module '{label}' in train mode (call model.eval())")
            if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
                causes.append(f"BatchNorm module '{label}' in train mode (call model.eval())")
        if shuffles(getattr(self.problem, "data", None)):
            causes.append("the DataLoader shuffles (use shuffle=False)")
        if not causes:
            causes.append("randomness inside the model's forward pass or a data iterable whose order changes")
        return "; ".join(causes)

    # ----------------------------------------------------------- exports
    def to_dense(self, max_dim: int = DENSE_LIMIT, chunk: int = 64) -> Tensor:
        """The d×d matrix, ``chunk`` columns per vectorized product (tiny models only; refuses d > ``max_dim``)."""
        if self.dim > max_dim:
            raise SolverError(
                f"to_dense() on a {self.dim}-dimensional operator would need a {self.dim}x{self.dim} matrix; "
                f"raise max_dim (now {max_dim}) if you really want it"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        blocks = []
        for start in range(0, self.dim, chunk):
            E = eye[start : start + chunk]
            V = tuple(t.reshape(E.shape[0], *s) for t, s in zip(self._split_rows(E), self.problem.shapes))
            CV = self.matmat_params(V)
            blocks.append(torch.cat([t.reshape(E.shape[0], -1) for t in CV], dim=1))
        return torch.cat(blocks, dim=0).T.contiguous()

    def _split_rows(self, E: Tensor) -> list[Tensor]:
        return list(torch.split(E, [s.numel() for s in self.problem.shapes], dim=1))

    def to_scipy(self) -> LinearOperator:
        """A scipy ``LinearOperator`` (float64 numpy in and out) for use with ``scipy.sparse.linalg``."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: Any) -> Any:
            t = torch.as_tensor(x.reshape(-1)).to(self.device, self.dtype)
            return self.problem.flatten(self.matvec_params(self.problem.unflatten(t))).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype="float64")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, reduction={self.problem.reduction!r})"
