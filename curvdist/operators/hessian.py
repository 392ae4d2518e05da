"""The Hessian of the empirical risk, ∇²L(θ), applied matrix-free in the fastest correct way for the model.

    H v = s · Σ_batches ∇²_θ ℓ_b(θ) v,   ℓ_b = Σ_{n in batch} ℓ(f(x_n; θ), y_n),

one per-batch product per (micro-)batch. The per-batch product has three modes (:mod:`.hvp_modes`):
``forward_over_reverse`` and ``reverse_over_reverse`` are exact (Pearlmutter 1994), ``finite_difference`` is a
central difference of two gradients (Nocedal & Wright 2006, §8.1) for engines without second derivatives.
``mode="auto"`` (the default) times the exact modes on the first batch when the operator is built and keeps the
fastest; the choice and the timings are recorded on the operator (:meth:`Hessian.product_info`). Reverse-over-reverse
products at an unchanged θ share the forward pass and the first backward (``reuse_graph``): each product is then
one backward through the kept graph of the gradient. A memory budget (``memory_budget``) bounds the graph a product
holds: where a product on a whole batch would keep more than the budget, every batch is split into micro-batches
whose graphs fit (the sum is the same to rounding), and a graph is kept between products only where it fits.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..catalogue import HVPMode, parse
from ..errors import AutodiffError, CurvdistError, ProblemError, first_line
from ..problem.data import batch_len, micro_batches
from ..problem.problem import Params
from ..resources import release_free_memory
from .base import CurvatureOperator, add_parts, relative_difference
from .graph_memory import (
    MIN_SPLIT_BYTES,
    GraphSize,
    batch_tensors,
    fitting_micro_batch,
    measure_graph,
    saved_bytes,
)
from .hvp_modes import (
    EXACT_MODES,
    Edges,
    Kernel,
    block_kernel,
    compile_kernel,
    default_fd_step,
    eager_kernel,
    gradient_graph,
    leaves_of,
    through_graph,
    warn_compile_failed,
)

#: auto's timing: rounds over the candidates (the minimum per candidate counts) until _BUDGET_S seconds are spent or
#: _MAX_ROUNDS are done, and at least two rounds when the two fastest are within _CLOSE of each other
_BUDGET_S = 1.0
_MAX_ROUNDS = 7
_CLOSE = 0.85

#: a product's graph is taken to be at most this many times the forward graph of the same batch when deciding
#: whether measuring the products' graphs is needed at all (measured on a GPT-2 decoder: 2.1× for reverse-over-
#: reverse's kept graph, 3.5× for forward-over-reverse with its tangents)
_PRODUCT_OVER_FORWARD = 8


@dataclass
class ModeChoice:
    """The outcome of ``mode="auto"``: the chosen mode, whether its kernel is compiled, the measured seconds per
    batch product of every candidate and the errors of those that failed."""

    mode: HVPMode
    compiled: bool
    timings: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


#: auto choices per model, parameter selection, dtype, device and compile setting, for the life of the model: every
#: operator of one model in a process uses the same product (so local and sharded products agree bit for bit) and
#: the measurement is paid once
_CHOICES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], ModeChoice]] = weakref.WeakKeyDictionary()


def clear_mode_cache() -> None:
    """Forget every ``mode="auto"`` choice, so that the next Hessian operator measures again."""
    _CHOICES.clear()


class Hessian(CurvatureOperator):
    """H v = s · Σ_b ∇²_θ ℓ_b(θ) v, the exact Hessian of the risk (Pearlmutter 1994), or its finite-difference
    approximation.

    Args:
        problem: the problem.
        mode: ``"auto"`` (default), ``"forward_over_reverse"``, ``"reverse_over_reverse"`` or
            ``"finite_difference"`` (:class:`curvdist.catalogue.HVPMode`). ``auto`` runs each exact mode on the
            first batch (one warm-up product, then timed rounds — the minimum counts — until 1 s is spent or 7
            rounds are done, at least two when the two fastest are within 15%), keeps the fastest, and skips a mode
            that raises (e.g. an op without a forward-mode derivative); finite differences only when no exact mode
            works (with a warning). The exact modes must agree with each other to √u relative; when they do not,
            the plain-autograd ``reverse_over_reverse`` is kept with a warning. The choice is cached per model,
            parameter selection, dtype, device, ``compile`` and graph-reuse setting (:func:`clear_mode_cache`
            forgets it).
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: compile the per-batch product written
            with ``torch.func`` transforms. Under ``auto`` the compiled kernels of the exact modes join the eager
            ones in the timing, so compilation is used only where it pays on this model; with an explicit mode
            the kernel is compiled unconditionally. If compilation fails the eager product is used with a
            ``RuntimeWarning``. Block products (``matmat``) stay eager.
        fd_step: the relative step h of ``finite_difference``: ε = h·max(1, ‖θ‖)/‖v‖ (default u^{1/3} of the
            parameters' dtype).
        reuse_graph: keep the graph of ∇ℓ_b (built with ``create_graph=True``) between reverse-over-reverse
            products and run only the second backward per product — the forward pass and the first backward do not
            depend on v, so every product at the same θ can share them (as PyHessian does). The graph is rebuilt
            when any selected parameter, model parameter or buffer has changed in place (their version counters;
            writes through ``.data`` bypass them: call :meth:`release_graph` after those), and
            :meth:`release_graph` frees it. It holds the activations and the backward graph of every batch
            between products, so the default (``None``) reuses it only for a problem of one (micro-)batch, whose
            product needs that memory anyway; ``True`` for every batch, ``False`` never. Under ``auto`` the
            reverse-over-reverse timing is then that of a product through the kept graph.
        check_determinism: apply H twice to one vector at construction and compare (skipped when ``auto`` has
            already compared two products of the chosen kernel on the only batch); always with fresh graphs.
        memory_budget: the bytes one product's autograd graph may hold (the tensors saved for backward: activations,
            tangents; measured exactly by :mod:`~curvdist.operators.graph_memory`). ``"auto"`` (default): what the
            forward pass of a gradient on the first batch saves, less the parameters' bytes, but at least 64 MiB
            (smaller graphs are never split): a product's graph and the gradient ∇ℓ_b it holds beside it take no
            more than a gradient of the same data keeps for its backward. On a 23M-parameter GPT-2 decoder (8 × 64
            tokens) construction and one product peaked at 1.65–1.8× a plain gradient (2.1× with the forward
            graph alone as the budget, 4.3× without a budget; ``benchmarks/memory_benchmark.py``), each product
            2.0× slower than through a kept graph. An ``int``: that many bytes; ``None``: no limit (the fastest
            products). Where a mode's graph on a whole batch exceeds the budget, its products run on micro-batches
            of the largest size that fits (:attr:`product_micro_batch`), and a reverse-over-reverse graph is kept
            between products (``reuse_graph``'s default) only where the whole batch's graph fits.
            ``reuse_graph=True`` keeps whole graphs regardless. Where the budget splits reverse-over-reverse's
            batches, ``auto`` takes that mode without timing the others (:attr:`mode_source` ``"budget"``):
            forward-over-reverse carries a tangent beside every saved activation (its graph measured 1.4× as
            large on a GPT-2 decoder, and its parameter-sized work larger too), and timing both would hold two
            modes' results at once. The graph of a mode on n samples is measured on one and two samples of the
            first batch (affine in n); the measurement is skipped when the forward graph is under 1/8 of the
            budget.

    Attributes:
        mode: the :class:`~curvdist.catalogue.HVPMode` in use (never ``auto``).
        requested_mode: the mode asked for.
        compiled: whether the single-vector product is compiled.
        mode_timings: seconds per product on the first batch of each candidate ``auto`` measured (keys
            ``forward_over_reverse``, ``reverse_over_reverse`` and, with ``compile``, ``…+compile``); empty for
            an explicit mode.
        mode_failures: the error of every candidate that failed.
        mode_source: ``"user"``, ``"measured"``, ``"cached"`` or ``"budget"`` (see ``memory_budget``).
        reuse_graph: whether products run through a kept graph of the gradient.
        fd_error_estimate: for ``finite_difference``, ‖P(h) − P(2h)‖/(3‖P(h)‖) on the first batch (the Richardson
            estimate of the O(h²) truncation error, relative); ``None`` otherwise.
        memory_budget_bytes: the budget in bytes (``None``: no limit).
        forward_graph_bytes: the bytes the forward pass saves on the first batch (``None`` without a budget).
        graph_sizes: per measured mode, its graph G(n) = fixed + per_sample·n in bytes.
        product_micro_batch: the micro-batch size the products of :attr:`mode` run on (``None``: whole batches).
    """

    kind = "hessian"
    fresh_parts = True  # every kernel returns new tensors (autograd results, tangents, differences)

    def __init__(self, problem: Any, mode: str = "auto", compile: bool | str = False, fd_step: float | None = None,
                 reuse_graph: bool | None = None, check_determinism: bool = True,
                 memory_budget: int | str | None = "auto") -> None:
        requested = parse(HVPMode, mode, "Hessian-vector product mode")
        if isinstance(compile, bool):
            backend: str | None = "inductor" if compile else None
        elif isinstance(compile, str) and compile:
            backend = compile
        else:
            raise ProblemError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
        if fd_step is not None and (isinstance(fd_step, bool) or not isinstance(fd_step, (int, float))
                                    or not math.isfinite(fd_step) or fd_step <= 0):
            raise ProblemError(f"fd_step must be a positive finite number, got {fd_step!r}")
        if reuse_graph is not None and not isinstance(reuse_graph, bool):
            raise ProblemError(f"reuse_graph must be True, False or None, got {reuse_graph!r}")
        if reuse_graph and requested not in (HVPMode.AUTO, HVPMode.REVERSE_OVER_REVERSE):
            raise ProblemError(f"reuse_graph=True keeps the graph of a reverse-over-reverse product; mode "
                               f"{requested.value} has none to keep")
        if not (memory_budget is None or memory_budget == "auto" or (
                isinstance(memory_budget, int) and not isinstance(memory_budget, bool) and memory_budget > 0)):
            raise ProblemError(f"memory_budget must be 'auto', a positive number of bytes or None, got "
                               f"{memory_budget!r}")
        super().__init__(problem, check_determinism=False)
        self.requested_mode: HVPMode = requested
        self.compile_backend = backend
        self.fd_step: float = float(fd_step) if fd_step is not None else default_fd_step(problem.dtype)
        self.mode_timings: dict[str, float] = {}
        self.mode_failures: dict[str, str] = {}
        self.fd_error_estimate: float | None = None
        self.compiled = False
        self._repeat_ok = False
        self.reuse_graph = False  # products use fresh graphs until construction (and its checks) are done
        self._graphs: dict[int, tuple[tuple[tuple[int, int], ...], tuple[Params, Edges]]] = {}
        self.graph_sizes: dict[str, GraphSize] = {}
        self._micro: dict[HVPMode, int | None] = {}
        self._whole_graphs = bool(reuse_graph)
        self._plan_budget(memory_budget)
        ror_split = (self._micro_batch(HVPMode.REVERSE_OVER_REVERSE)
                     if requested in (HVPMode.AUTO, HVPMode.REVERSE_OVER_REVERSE) else None)
        self._may_reuse = (getattr(problem, "num_batches", None) == 1 and ror_split is None
                           ) if reuse_graph is None else reuse_graph
        if requested == HVPMode.AUTO and ror_split is not None:
            self.mode_source = "budget"  # memory binds: the mode with no tangents to carry, without a timing race
            self._use(HVPMode.REVERSE_OVER_REVERSE, False)
        elif requested == HVPMode.AUTO:
            self._choose()
        else:
            self.mode_source = "user"
            self._use(requested, backend is not None)
            if backend is not None:
                self._warm_compiled()
        if self.mode == HVPMode.FINITE_DIFFERENCE:
            self._estimate_fd_error()
        if check_determinism and not (self._repeat_ok and getattr(problem, "num_batches", None) == 1):
            self.check_determinism()
        self.reuse_graph = bool(self._may_reuse and self.mode == HVPMode.REVERSE_OVER_REVERSE and not self.compiled)
        if not self.reuse_graph:
            self._graphs.clear()

    # ----------------------------------------------------------- memory budget
    def _plan_budget(self, memory_budget: int | str | None) -> None:
        """The budget in bytes, from the forward graph of the first batch under ``"auto"``."""
        self.memory_budget_bytes: int | None = None
        self.forward_graph_bytes: int | None = None
        self._measure_products = False
        if memory_budget is None:
            return
        params, (X, y) = self.problem.params, self._first_batch()
        self._first_len = batch_len(X)

        def forward() -> None:
            with torch.enable_grad():
                self.problem.batch_loss(leaves_of(params), X, y)

        self.forward_graph_bytes = saved_bytes(forward, [*params, *batch_tensors(X, y)])
        parameter_bytes = sum(p.numel() * p.element_size() for p in params)
        budget = (max(self.forward_graph_bytes - parameter_bytes, MIN_SPLIT_BYTES) if memory_budget == "auto"
                  else int(memory_budget))
        self.memory_budget_bytes = budget
        self._measure_products = self.forward_graph_bytes * _PRODUCT_OVER_FORWARD > budget
        self._trim()

    def _micro_batch(self, mode: HVPMode) -> int | None:
        """The micro-batch size that keeps ``mode``'s graph within the budget (``None``: whole batches)."""
        if mode in self._micro:
            return self._micro[mode]
        size: int | None = None
        if self._measure_products and not (self._whole_graphs and mode == HVPMode.REVERSE_OVER_REVERSE):
            params, (X, y) = self.problem.params, self._first_batch()
            v = tuple(torch.ones_like(p) for p in params)  # any tangent: the graph's size does not depend on it
            loss = self.problem.batch_loss
            build: Any = {
                HVPMode.REVERSE_OVER_REVERSE: lambda Xn, yn: gradient_graph(loss, params, Xn, yn),
                HVPMode.FORWARD_OVER_REVERSE: lambda Xn, yn: eager_kernel(mode, loss)(params, v, Xn, yn),
                HVPMode.FINITE_DIFFERENCE: lambda Xn, yn: eager_kernel(mode, loss, self.fd_step)(params, v, Xn, yn),
            }[mode]
            try:
                graph = measure_graph(build, X, y, [*params, *v])
            except CurvdistError:
                raise
            except (RuntimeError, NotImplementedError):  # the mode fails on this model; auto finds that itself
                graph = None
            self._trim()
            if graph is not None:
                self.graph_sizes[mode.value] = graph
                size = fitting_micro_batch(graph, self.memory_budget_bytes, self._first_len)
        self._micro[mode] = size
        return size

    def _trim(self) -> None:
        """Between the construction's passes, when memory is what the budget guards: hand the allocator's free
        memory back, so that the next pass starts from the live memory rather than the last pass's heap."""
        if self._measure_products:
            release_free_memory()

    def product_batches(self) -> Any:
        """The problem's batches, each split into micro-batches of :attr:`product_micro_batch` samples where the
        memory budget asks for it."""
        size = self.product_micro_batch
        for batch in self.problem.batches():
            yield from micro_batches(batch, size)

    def _split(self, kernel: Kernel, size: int | None) -> Kernel:
        """``kernel`` summed over micro-batches of at most ``size`` samples of a batch (``kernel`` if None): a
        candidate of ``auto`` timed as its products would run."""
        if size is None:
            return kernel

        def split(params: Params, v: Params, X: Any, y: Tensor) -> Params:
            total: list[Tensor] | None = None
            for Xi, yi in micro_batches((X, y), size):
                total = add_parts(total, kernel(params, v, Xi, yi), self.dtype)
            assert total is not None
            return tuple(total)

        return split

    @property
    def product_micro_batch(self) -> int | None:
        return self._micro.get(self.mode)

    # ----------------------------------------------------------- kernels
    def _kernel(self, mode: HVPMode, compiled: bool) -> Kernel:
        loss = self.problem.batch_loss
        step = self.fd_step if mode == HVPMode.FINITE_DIFFERENCE else None
        if compiled:
            assert self.compile_backend is not None
            return compile_kernel(mode, loss, step, self.compile_backend)
        return eager_kernel(mode, loss, step)

    def _use(self, mode: HVPMode, compiled: bool, kernel: Kernel | None = None) -> None:
        self.mode: HVPMode = mode
        self.compiled = compiled
        self._matvec_kernel = kernel if kernel is not None else self._kernel(mode, compiled)
        self._micro_batch(mode)  # the products' micro-batch size (product_batches)
        self._block_kernel = block_kernel(mode, self.problem.batch_loss,
                                          self.fd_step if mode == HVPMode.FINITE_DIFFERENCE else None)

    def batch_context(self, params: Params, X: Any, y: Tensor, batch_index: int) -> Any:
        return batch_index

    def batch_matvec(self, params: Params, v: Params, X: Any, y: Tensor, ctx: Any) -> Params:
        if self.reuse_graph and isinstance(ctx, int):
            return through_graph(self._graph(ctx, params, X, y), v)
        return self._matvec_kernel(params, v, X, y)

    # ----------------------------------------------------------- kept gradient graphs
    def _signature(self) -> tuple[tuple[int, int], ...]:
        """Identity and version counter of every tensor the gradient's graph was built from."""
        model = getattr(self.problem, "model", None)
        tensors = list(self.problem.params)
        if model is not None:
            tensors += list(model.parameters()) + list(model.buffers())
        return tuple((id(t), t._version) for t in tensors)

    def _graph(self, b: int, params: Params, X: Any, y: Tensor) -> tuple[Params, Edges]:
        """The kept graph of ∇ℓ for batch ``b``, rebuilt when a parameter or buffer changed in place."""
        signature = self._signature()
        entry = self._graphs.get(b)
        if entry is None or entry[0] != signature:
            self._graphs.pop(b, None)  # free the stale graph before building the new one
            entry = (signature, gradient_graph(self.problem.batch_loss, params, X, y))
            self._graphs[b] = entry
        return entry[1]

    def release_graph(self) -> None:
        """Free the kept gradient graphs (they are rebuilt on the next product if ``reuse_graph``)."""
        self._graphs.clear()

    def matmat_params(self, V: Params) -> Params:
        """H V = s · Σ_b ∇²ℓ_b(θ) [v₁ … v_k] for k vectors stacked along a leading axis, one batched pass per batch
        (:func:`~curvdist.operators.hvp_modes.block_kernel`): reverse-over-reverse is one forward and one first
        backward, ∇ℓ_b and its pullback u ↦ ∇²ℓ_b u (``torch.func.vjp`` of ``torch.func.grad``), then the pullback
        ``vmap``-ed over the k cotangents; forward-over-reverse is ``vmap`` over the k tangents of
        ``torch.func.jvp(torch.func.grad(ℓ_b))``; finite differences ``vmap`` each vector's own difference of
        gradients. Where vmap fails, a loop (:attr:`block_vectorized` turns False). Block products always use
        fresh graphs (``reuse_graph`` concerns single products) and are not compiled."""
        return self._accumulate(V, lambda p, u, X, y, c: self._block_kernel(p, u, X, y))

    def _block_params(self, V: Params) -> Params:
        """:meth:`apply_block`'s product: :meth:`matmat_params`, except while products run through kept graphs of ∇ℓ_b
        (``reuse_graph``): then the forward passes and first backwards are already shared by every product at this
        θ, and the block is one second backward per vector through the kept graph — the single products themselves
        (a ``vmap``-ed backward through the graph, or a fresh batched graph, measured slower per vector on a GPT-2)."""
        if not self.reuse_graph:
            return self.matmat_params(V)
        k = V[0].shape[0]

        def columns(p: Params, u: Params, X: Any, y: Tensor, c: Any) -> Params:
            cols = [self.batch_matvec(p, tuple(t[i] for t in u), X, y, c) for i in range(k)]
            return tuple(torch.stack([col[j] for col in cols]) for j in range(len(u)))

        return self._accumulate(V, columns)

    @property
    def block_vectorized(self) -> bool:  # type: ignore[override]
        """Whether the block kernel of :meth:`matmat_params` is vectorized with ``vmap`` (False once it fell back to a
        loop). Under ``reuse_graph``, :meth:`apply_block` goes through the kept graphs one vector at a time by
        design."""
        return not getattr(self._block_kernel, "fell_back", False)

    # ----------------------------------------------------------- construction-time measurement
    def _probe(self) -> tuple[Params, Params, Any, Tensor]:
        """The parameters, the seed-0 vector of :meth:`check_determinism` and the first batch."""
        g = torch.Generator(device="cpu").manual_seed(0)
        flat = torch.randn(self.dim, generator=g, dtype=torch.float64).to(self.device, self.problem.dtype)
        X, y = self._first_batch()
        return self.problem.params, self.problem.unflatten(flat), X, y

    def _first_batch(self) -> tuple[Any, Tensor]:
        """The problem's first (micro-)batch: where ``auto`` and the memory budget measure."""
        return next(iter(self.problem.batches()))

    def _choose(self) -> None:
        key = (self.problem.param_names, str(self.problem.dtype), str(self.device), self.compile_backend,
               bool(self._may_reuse), tuple(self._micro_batch(m) for m in EXACT_MODES))
        model = getattr(self.problem, "model", None)
        try:
            cached = _CHOICES.get(model, {}).get(key) if model is not None else None
        except TypeError:  # a model that cannot be weakly referenced
            cached = None
        if cached is not None:
            self.mode_source = "cached"
            self.mode_timings, self.mode_failures = dict(cached.timings), dict(cached.failures)
            self._use(cached.mode, cached.compiled)
            return
        self.mode_source = "measured"
        choice = self._measure()
        if model is not None:
            try:
                _CHOICES.setdefault(model, {})[key] = choice
            except TypeError:
                pass

    def _measure(self) -> ModeChoice:
        params, v, X, y = self._probe()
        candidates = [(m, False) for m in EXACT_MODES]
        if self.compile_backend is not None:
            candidates += [(m, True) for m in EXACT_MODES]
        kernels: dict[str, Kernel] = {}
        raw: dict[str, Kernel] = {}
        first: dict[str, Params] = {}
        failures: dict[str, str] = {}
        for mode, compiled in candidates:  # warm-up: also compiles, and finds the modes that fail
            name = mode.value + ("+compile" if compiled else "")
            raw[name] = self._kernel(mode, compiled)
            kernel = self._split(raw[name], self._micro_batch(mode))  # timed as its products will run
            try:
                first[name] = kernel(params, v, X, y)
                if self._may_reuse and mode == HVPMode.REVERSE_OVER_REVERSE and not compiled:
                    kernel = self._kept_graph_kernel()
            except CurvdistError:
                raise
            except Exception as e:
                if not compiled and not isinstance(e, (RuntimeError, NotImplementedError)):
                    raise
                failures[name] = first_line(e, typed=True)
                if compiled:
                    warn_compile_failed(mode, e)
                continue
            kernels[name] = kernel
            self._trim()
        self.mode_failures = failures
        if not kernels:
            return self._fall_back_to_fd(failures)
        timings: dict[str, float] = {name: math.inf for name in kernels}
        repeat_ok: dict[str, bool] = {}
        tol = 1e-10 if self.problem.dtype == torch.float64 else 1e-4
        start = time.perf_counter()
        for round_ in range(_MAX_ROUNDS):
            for name, kernel in kernels.items():
                prepare = getattr(kernel, "prepare", None)
                if prepare is not None:  # build the kept graph untimed; it is freed before the next candidate
                    prepare(params, X, y)
                t0 = time.perf_counter()
                out = kernel(params, v, X, y)
                timings[name] = min(timings[name], time.perf_counter() - t0)
                self._graphs.clear()
                self._trim()
                if round_ == 0:
                    repeat_ok[name] = relative_difference(out, first[name]) <= tol
            ranked = sorted(timings.values())
            if len(ranked) < 2:
                break
            close = ranked[0] / ranked[1] >= _CLOSE
            if time.perf_counter() - start >= _BUDGET_S and not (close and round_ == 0):
                break
        self.mode_timings = dict(timings)
        best = min(timings, key=timings.__getitem__)
        reference = next(iter(first))
        agree = math.sqrt(float(torch.finfo(self.problem.dtype).eps))
        spread = max(relative_difference(first[n], first[reference]) for n in kernels)
        if spread > agree:
            fallback = HVPMode.REVERSE_OVER_REVERSE.value
            warnings.warn(f"the exact Hessian-vector product modes disagree on this model (relative difference "
                          f"{spread:.2e} > {agree:.1e}); using {fallback} (plain autograd)", RuntimeWarning,
                          stacklevel=4)
            best = fallback if fallback in kernels else best
        mode_name, _, suffix = best.partition("+")
        mode, compiled = HVPMode(mode_name), bool(suffix)
        self._use(mode, compiled, raw[best] if compiled else None)
        self._repeat_ok = repeat_ok[best]
        return ModeChoice(mode, compiled, dict(timings), dict(failures))

    def _kept_graph_kernel(self) -> Kernel:
        """The product through a kept graph of the probe batch (batch 0): what a reverse-over-reverse product costs
        when ``reuse_graph`` applies. Its ``prepare`` builds the graph before each timed product, and the timing
        loop frees it after, so no other candidate runs while a graph is kept (the peak of ``auto`` is that of its
        costliest candidate, not their sum)."""
        def kernel(p: Params, u: Params, X_: Any, y_: Tensor) -> Params:
            return through_graph(self._graph(0, p, X_, y_), u)

        kernel.prepare = lambda p, X_, y_: self._graph(0, p, X_, y_)  # type: ignore[attr-defined]
        return kernel

    def _fall_back_to_fd(self, failures: dict[str, str]) -> ModeChoice:
        listing = "; ".join(f"{k}: {v}" for k, v in failures.items())
        params, v, X, y = self._probe()
        kernel = self._kernel(HVPMode.FINITE_DIFFERENCE, False)
        try:
            kernel(params, v, X, y)
        except (RuntimeError, NotImplementedError) as e:
            raise AutodiffError(f"no Hessian-vector product works on this model ({listing}; "
                                f"finite_difference: {first_line(e, typed=True)})") from e
        warnings.warn(f"no exact Hessian-vector product works on this model ({listing}); using finite "
                      f"differences (relative step {self.fd_step:.2g}; on piecewise-linear networks — ReLU, "
                      "max-pool — a difference step that crosses a kink is far from the almost-everywhere Hessian)",
                      RuntimeWarning, stacklevel=5)
        self._use(HVPMode.FINITE_DIFFERENCE, False, kernel)
        return ModeChoice(HVPMode.FINITE_DIFFERENCE, False, {}, dict(failures))

    def _warm_compiled(self) -> None:
        """First call of an explicitly requested compiled kernel (compiles it); on failure, the eager one."""
        params, v, X, y = self._probe()
        try:
            self._matvec_kernel(params, v, X, y)
        except CurvdistError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the eager product still works
            self.mode_failures[self.mode.value + "+compile"] = first_line(e, typed=True)
            warn_compile_failed(self.mode, e)
            self._use(self.mode, False)

    def _estimate_fd_error(self) -> None:
        params, v, X, y = self._probe()
        h = self.fd_step
        a = eager_kernel(HVPMode.FINITE_DIFFERENCE, self.problem.batch_loss, h)(params, v, X, y)
        b = eager_kernel(HVPMode.FINITE_DIFFERENCE, self.problem.batch_loss, 2 * h)(params, v, X, y)
        self.fd_error_estimate = relative_difference(a, b) / 3.0

    # ----------------------------------------------------------- report
    def product_info(self) -> dict[str, Any]:
        """How the products are computed, for result records: mode, compiled, how the mode was chosen, the
        measured timings and failures, and for finite differences the step and the error estimate."""
        info: dict[str, Any] = {"mode": self.mode.value, "requested_mode": self.requested_mode.value,
                                "compiled": self.compiled, "reuse_graph": self.reuse_graph,
                                "mode_source": self.mode_source,
                                "mode_timings_s": dict(self.mode_timings)}
        if self.mode_failures:
            info["mode_failures"] = dict(self.mode_failures)
        if self.mode == HVPMode.FINITE_DIFFERENCE:
            info["fd_step"] = self.fd_step
            info["fd_error_estimate"] = self.fd_error_estimate
        if self.memory_budget_bytes is not None:
            info["memory_budget_bytes"] = self.memory_budget_bytes
            info["forward_graph_bytes"] = self.forward_graph_bytes
            info["product_micro_batch"] = self.product_micro_batch
            if self.graph_sizes:
                info["graph_bytes"] = {k: {"fixed": g.fixed, "per_sample": g.per_sample}
                                       for k, g in self.graph_sizes.items()}
        return info

    def __repr__(self) -> str:
        return (f"Hessian(dim={self.dim}, dtype={self.dtype}, reduction={self.problem.reduction!r}, "
                f"mode={self.mode.value!r}, compiled={self.compiled})")
