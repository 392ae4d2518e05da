"""Pipeline mode, stage side: stage s of S holds only its own parameters and runs its piece of every product.

Splitting (:mod:`curvdist.distributed.stacks`): an ``nn.Sequential`` or a ``stages()`` list of modules, or a block
stack (a Hugging Face decoder or encoder) traced and cut at its blocks; cuts balance the parameters each stage
holds. The value between stages is a named *carry* of tensors (hidden states, masks, token ids, ...).

Products, per micro-batch, with v sharded by stage (a parameter tied across stages is owned by the first stage that
uses it; later users receive the owner's part of v and return their part of C v, which the owner adds):

* GGN/Fisher: forward, stage s computes (c_s, ċ_s) = jvp(f_s, (c_{s−1}, θ_s), (ċ_{s−1}, v_s)); the last stage
  applies the loss Hessian, u = Λ ḟ; backward, stage s maps u through vjp(f_s)(u) = (u_c, u_θ) and keeps u_θ.
* Hessian: the same forward pass; the last stage starts the gradient and its directional derivative,
  (g, ġ) = (∂ℓ/∂f, ∂²ℓ/∂f² ḟ); backward, stage s needs the JVP of the VJP,
  jvp((c, θ, g) ↦ vjp(f_s)(g), (c_{s−1}, θ_s, g), (ċ_{s−1}, v_s, ġ)) = ((g_c, g_θ), (ġ_c, ġ_θ)),
  keeps ġ_θ (its shard of H v) and passes (g_c, ġ_c) on. It takes the tangents by reverse over reverse: with
  (g_c, g_θ) = vjp(f_s)(g) and its graph, the scalar S = ⟨g_θ, v_s⟩ + ⟨g_c, ċ_{s−1}⟩ + ⟨f_s, ġ⟩ has gradient
  (ġ_θ, ġ_c), so a second backward adds ġ_θ into the output. Each parameter's primal g_θ is freed as the first
  backward makes it and each contribution to ġ_θ is added into the output as it is made
  (:mod:`curvdist.operators.cotangents`); forward over reverse would hold g_θ and ġ_θ side by side (two shards).

Each call returns one object (the carry with its tangents, or the cotangents), so one object-store transfer
crosses a stage boundary per micro-batch and direction; vectors live on the stage actors as shards and the
coordinator sees only scalars (:class:`~curvdist.distributed.pipeline.ShardedSpace`). Every stage times its calls
(for the stage utilization) and measures its peak resident memory (:mod:`curvdist.resources`).

Faults: vectors are shards in the stage's :class:`~.shard_store.ShardStore`, written to its snapshot directory at
the start of every K-th product. A stage lost during a product is restarted by Ray, rebuilds its piece of the model
from the spec and loads the last snapshot; the coordinator replays the operations logged since on it and runs the
product again, so the solve continues to the numbers of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.func import jvp

from ..errors import MetricError, ProblemError, failures_inside_torch
from ..faults import maybe_fail
from ..operators.cotangents import accumulating_into, gradient_edges
from ..operators.tangents import exact_alias
from ..problem.data import as_batches, inputs_to, slice_inputs, unpack
from ..problem.losses import make_loss
from ..problem.spec import ProblemSpec
from ..resources import memory_record, release_free_memory, reset_peak
from .cluster import ClusterError
from .materialize import Weights
from .shard_store import ShardStore, guard_restarts
from . import wire
from .stacks import (Balance, SequentialProgram, StageProgram, TracedProgram, split_floats, split_points, stage_modules,
                     stage_program)

__all__ = ["StageWorker", "split_points", "stage_modules", "micro_batch_bounds"]


#: the metric operations a stage applies to its shard of a vector (:meth:`StageWorker.metric_apply`)
METRIC_METHODS = ("apply", "apply_undamped", "solve", "inv_factor_apply", "inv_factor_t_apply", "inv_sqrt_apply")

def micro_batch_bounds(n: int, micro_batches: int | None, size: int | None) -> list[tuple[int, int]]:
    """[start, stop) of the micro-batches of a batch of n samples: ``micro_batches`` near-equal parts, or parts
    of at most ``size`` samples, or the batch itself."""
    if micro_batches is not None and micro_batches > 1:
        edges = np.linspace(0, n, min(micro_batches, n) + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if size is not None and size < n:
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    return [(0, n)]


def micro_batches_of(spec: ProblemSpec, micro_batches: int | None, device: torch.device
                     ) -> Iterator[tuple[int, int, Any, Tensor]]:
    """(global index of its first sample, its batch, inputs, targets) of every micro-batch of the spec's data, in
    order, on ``device`` in the spec's dtype (integer targets keep theirs)."""
    dtype, seen = getattr(torch, spec.dtype), 0
    for i, batch in enumerate(as_batches(spec.build_data(), spec.batch_size)):
        X, y = unpack(batch, i)
        for a, b in micro_batch_bounds(y.shape[0], micro_batches, spec.micro_batch_size):
            yb = y[a:b]
            yield (seen + a, i, inputs_to(slice_inputs(X, a, b), device, dtype),
                   yb.to(device, dtype) if yb.is_floating_point() else yb.to(device))
        seen += y.shape[0]


def _uses_by_stage(model: Any, stages: int, program: StageProgram, balance: Balance) -> list[list[str]]:
    """The problem names of the parameters each stage uses (to find each parameter's owner)."""
    if isinstance(program, TracedProgram):
        return program.uses_by_stage
    return [SequentialProgram(model, bounds).uses for bounds in split_points(model, stages, balance)]


@guard_restarts
class StageWorker(ShardStore):
    """Stage ``stage`` of ``stages``: its program, its parameters, the micro-batches (inputs for the first stage,
    labels for the last), and a store of vector shards keyed by integer ids."""

    def __init__(self, spec: ProblemSpec, stage: int, stages: int, micro_batches: int | None = None,
                 snapshot_dir: str | None = None, balance: Balance = "parameters", basis_dir: str | None = None,
                 threads: int | None = None) -> None:
        import ray

        if threads is not None:  # more than Ray's one per CPU: see StagePool (threads)
            torch.set_num_threads(threads)
        self.stage, self.stages = stage, stages
        self.last = stage == stages - 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype, self.device = getattr(torch, spec.dtype), torch.device(device)
        self.loss = make_loss(spec.loss)
        self.spec, self.micro_batches = spec, micro_batches
        self.balance = balance
        self.saved: dict[int, Any] = {}
        self.pending: dict[int, Any] = {}  # the last stage's (g, ġ) between its forward and backward
        self.grad_saved: dict[int, Any] = {}  # what a gradient's backward pass needs, per micro-batch
        self.optimizer: Any = None  # the stage-local optimizer of pipeline training
        self.version = 0  # parameter updates made (pipeline training)
        self.tied_v: dict[str, Tensor] = {}
        self.metrics: dict[int, Any] = {}  # stage blocks of the pipeline metrics, by metric id
        self.blocks: Any = None  # the statistics of the metric being built
        self.calls = 0
        self.busy = 0.0
        self.restarted = bool(getattr(ray.get_runtime_context(), "was_current_actor_reconstructed", False))
        self._open_store(None if snapshot_dir is None else Path(snapshot_dir) / f"stage{stage}",
                         None if basis_dir is None else Path(basis_dir) / f"stage{stage}")
        if self.restarted:  # a lone restart: build now (a new pool calls build itself, see StagePool)
            self.build()
            self._load_snapshot()

    def build(self, weights: Weights | None = None) -> None:
        """Build the model's structure, keep this stage's part and its micro-batches. With the pool's ``weights``
        (the model's published tensors, :mod:`.materialize`) the model is a ``meta`` skeleton and only this
        stage's parameters are fetched; without them (a stage Ray restarted, or a factory that cannot build on
        ``meta``) the whole model is built and the rest dropped, so :class:`~.pipeline.StagePool` builds such
        stages one after another."""
        self.weights = weights
        self.batches: list[tuple[Any, Tensor]] = []
        self.firsts: list[int] = []  # global index of each micro-batch's first sample (Monte-Carlo label keys)
        self.batch_of: list[int] = []  # the batch each micro-batch belongs to
        for first, i, X, y in micro_batches_of(self.spec, self.micro_batches, self.device):
            self.firsts.append(first)
            self.batch_of.append(i)
            self.batches.append((X, y))
        model = self._skeleton()
        self.program = stage_program(model, self.stage, self.stages, [X for X, _ in self.batches], self.balance)
        named = dict(model.named_parameters())
        order = list(self.spec.params) if self.spec.params else [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in order if n not in named]
        if unknown:
            raise ProblemError(f"unknown parameter names {unknown}; the model has {list(named)}")
        uses = _uses_by_stage(model, self.stages, self.program, self.balance)
        owner = {}
        for s, names in enumerate(uses):
            for n in names:
                owner.setdefault(n, s)
        missing = [n for n in order if n not in owner]
        if missing and self.stage == 0:
            raise ProblemError(f"pipeline stages do not use the parameters {missing}")
        index = {n: i for i, n in enumerate(order)}
        mine = uses[self.stage]
        self.names = sorted((n for n in mine if n in index and owner[n] == self.stage), key=index.__getitem__)
        self.foreign = {n: owner[n] for n in mine if n in index and owner[n] != self.stage}  # tied: name → owner
        self.tied_users = sorted({(n, s) for s, names in enumerate(uses) for n in names
                                  if n in index and owner[n] == self.stage and s != self.stage})
        if self.built == "skeleton":
            from .materialize import materialize_parameters

            self.values = materialize_parameters(model, mine, self.weights, self.device)  # type: ignore[arg-type]
        else:
            self.values = {n: named[n].detach() for n in mine}  # owned, tied copies and frozen ones
        offsets = np.concatenate([[0], np.cumsum([named[n].numel() for n in order])]).astype(int)
        del model, named
        self.shapes = [self.values[n].shape for n in self.names]
        sizes = [int(np.prod(s)) for s in self.shapes]
        #: where each owned parameter's entries lie in this stage's shard: (start, size)
        self.spans = list(zip(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist(), sizes))
        self.dim = sum(sizes)
        self.segments = [(int(offsets[index[n]]), self.values[n].numel()) for n in self.names]
        self.total = int(offsets[-1])
        self.weights = None  # drop the source: the pool frees the published model once every stage has built
        release_free_memory()

    def _skeleton(self) -> Any:
        """The model to trace and cut: a skeleton (built on ``meta``, then given uninitialized storage) with real
        buffers when the pool published the model's tensors, else (or when the factory fails on ``meta``) the whole
        model. Sets ``built``."""
        if self.weights is not None:
            from .materialize import materialize_buffers, to_empty

            try:
                with torch.random.fork_rng(devices=[]):
                    model = self.spec.build_skeleton()
            except Exception:  # noqa: BLE001 - a factory that computes with its tensors: build it whole
                model = None
            if model is not None:
                # uninitialized storage on the stage's device, so that tracing sees real devices (a graph traced
                # on meta keeps meta device arguments); on the CPU its pages are never touched, so never resident
                to_empty(model, self.device)
                materialize_buffers(model, self.weights, self.device)
                self.built = "skeleton"
                return model
        self.built = "whole"
        return self.spec.build_model(self.device.type)

    # ------------------------------------------------------------------ layout
    def info(self) -> dict[str, Any]:
        return {"dim": self.dim, "names": self.names, "segments": self.segments, "total": self.total,
                "samples": sum(self.loss.count(y) for _, y in self.batches), "batches": len(self.batches),
                "foreign": self.foreign, "tied_users": self.tied_users, "batch_of": self.batch_of,
                "counts": [self.loss.count(y) for _, y in self.batches],
                "held": sum(v.numel() for v in self.values.values()), "built": self.built,
                "threads": torch.get_num_threads()}

    def _tangents(self, vid: int) -> dict[str, Tensor]:
        """The tangent of every parameter the stage differentiates: its shard of v and the tied parts. The shard's
        pieces are exact aliases (:func:`~curvdist.operators.tangents.exact_alias`), which forward AD takes as they
        are; views of the flat shard it would copy, a shard's worth of memory more in every product."""
        t = {n: exact_alias(x) for n, x in self._pieces(vid).items()}
        t.update({n: self.tied_v[n] for n in self.foreign})
        return t

    def _diff(self) -> list[str]:
        return [*self.names, *self.foreign]

    def _fn(self, key: Any, const: dict[str, Tensor], float_out: list[str] | None = None) -> Any:
        """f_s as a function of (floating carry, differentiated parameters) with everything else held fixed;
        with ``float_out`` only those entries of the outgoing carry (for the VJP)."""
        fixed = {k: v for k, v in self.values.items() if k not in self._diff()}

        def f(carry: dict[str, Tensor], p: dict[str, Tensor]) -> Any:
            out = self.program({**fixed, **p}, {**carry, **const}, key)
            if float_out is not None and isinstance(out, dict):
                return {k: out[k] for k in float_out}
            return out

        return f

    # ------------------------------------------------------------------ products
    def begin(self, vid: int, out_id: int, tied: dict[str, Any], epoch: int | None = None) -> None:
        """Start a product of v = vectors[vid] into vectors[out_id]; ``tied`` holds (refs to) the owners' parts of
        v for the tied parameters this stage uses; ``epoch``: write snapshot ``epoch`` first."""
        import ray

        if epoch is not None:
            self._snapshot(epoch, background=True)  # written while the passes compute; waited for in finish
        self._current_v = vid
        self._set(out_id, torch.zeros(self.dim, dtype=self.dtype, device=self.device))
        self.tied_v = {n: wire.unpack(ray.get(r) if isinstance(r, ray.ObjectRef) else r, self.device)
                       for n, r in tied.items()}
        self.tied_out = {n: torch.zeros_like(t) for n, t in self.tied_v.items()}

    def _part(self, vid: int, name: str) -> Tensor:
        """The entries of vectors[vid] of the owned parameter ``name`` (a view)."""
        a, k = self.spans[self.names.index(name)]
        return self.vectors[vid][a:a + k]

    def _pieces(self, vid: int) -> dict[str, Tensor]:
        """vectors[vid] as one view per owned parameter, in its shape."""
        flat = self.vectors[vid]
        return {n: flat[a:a + k].view(s) for n, (a, k), s in zip(self.names, self.spans, self.shapes)}

    def tied_part(self, vid: int, name: str) -> wire.Packed:
        """The part of vectors[vid] of a parameter this stage owns (for a later stage that uses it too), packed
        (:mod:`.wire`: Ray copies it into its store as it returns)."""
        return wire.pack(self._part(vid, name).view(self.values[name].shape))

    def forward(self, b: int, incoming: Any, vid: int) -> Any:
        """(c_s, ċ_s, constants) of micro-batch b; the last stage also starts the backward pass (the loss's
        output gradient and Hessian) and keeps it for :meth:`backward`."""
        self._maybe_fail()
        t0 = time.perf_counter()
        X, y = self.batches[b]
        key = self.program.signature(X)
        if self.stage == 0:
            carry, const = split_floats(self.program.first_carry(X))
            cdot = {k: torch.zeros_like(v) for k, v in carry.items()}
        else:
            carry, cdot, const = incoming
        p = {n: self.values[n] for n in self._diff()}
        with self._in_torch(b, "forward pass (torch.func.jvp)"):
            out, outdot = jvp(self._fn(key, const), (carry, p), (cdot, self._tangents(vid)))
        self.saved[b] = (carry, cdot, const, key)
        if self.last:
            self.pending[b] = (out.detach(), outdot.detach(), y)
            result = None
        else:
            fo, co = split_floats(out)
            self.saved[b] += (list(fo),)
            result = ({k: v.detach() for k, v in fo.items()}, {k: outdot[k].detach() for k in fo}, co)
        self.busy += time.perf_counter() - t0
        return result

    def backward(self, b: int, incoming: Any, kind: str, out_id: int, scale: float | None = None,
                 parts: list[Any] | None = None) -> Any:
        """Stage VJP (GGN) or JVP-of-VJP (Hessian) of micro-batch b; accumulates this stage's shard of C v into
        ``out_id`` and returns the cotangents for the previous stage (one object). With ``scale`` (the product's
        last micro-batch) it also runs :meth:`finish` and returns (cotangents, this stage's part of ‖C v‖²): one
        call less per stage and product (the coordinator asks for two return objects)."""
        return self._finished(self._backward(b, incoming, kind, out_id), out_id, scale, parts)

    def _backward(self, b: int, incoming: Any, kind: str, out_id: int) -> Any:
        self._maybe_fail()
        t0 = time.perf_counter()
        carry, cdot, const, key, *rest = self.saved.pop(b)
        float_out = rest[0] if rest else None
        f = self._fn(key, const, float_out)
        p = {n: self.values[n] for n in self._diff()}
        with self._in_torch(b, "backward pass" + (" (reverse over reverse)" if kind == "hessian" else "")):
            if self.last:
                out, outdot, y = self.pending.pop(b)
                gdot = self.loss.output_hessian_apply(out, y, outdot)
                g = torch.func.grad(lambda o: self.loss.per_sample(o, y).sum())(out) if kind == "hessian" else None
            else:
                g, gdot = incoming
            if kind == "hessian":
                gcdot, gc = self._hvp_into(f, carry, cdot, p, g, gdot, out_id)
            else:
                gcdot, gc = self._vjp_into(f, carry, p, gdot, out_id), None
        self.busy += time.perf_counter() - t0
        if self.stage == 0:
            return None
        return (None if gc is None else {k: t.detach() for k, t in gc.items()},
                {k: t.detach() for k, t in gcdot.items()})

    def _in_torch(self, b: int, what: str) -> Any:
        """A failure inside torch during ``what`` of micro-batch b (an op or a custom ``autograd.Function`` without
        the derivative the pass needs, an in-place update of module state) raised as :class:`AutodiffError` naming
        the stage, the micro-batch and the pass (:func:`~curvdist.errors.failures_inside_torch`)."""
        return failures_inside_torch(f"pipeline stage {self.stage}: the {what} of micro-batch {b}", "",
                                     "a stage's forward pass must be a pure function of its parameters and incoming "
                                     "activations, built from ops with forward- and reverse-mode derivatives (a "
                                     "custom autograd.Function needs setup_context and jvp)")

    def drop_micro_batches(self) -> int:
        """Drop what the forward passes of a failed product or gradient kept for backward passes that will not
        run (activations, the loss's output gradients); returns how many micro-batches were held."""
        held = len(self.saved) + len(self.pending) + len(self.grad_saved)
        with contextlib.suppress(ClusterError):  # a failed write is kept and refused at the next snapshot
            self._settle_writes()
        self.saved.clear()
        self.pending.clear()
        self.grad_saved.clear()
        release_free_memory()
        return held

    def _vjp_into(self, f: Any, carry: dict[str, Tensor], p: dict[str, Tensor], cotangent: Any,
                  out_id: int) -> dict[str, Tensor] | None:
        """``vjp(f, carry, p)(cotangent)`` with the parameters' cotangents added into vectors[out_id] (owned) and
        ``tied_out`` (tied) as the backward pass reaches each parameter: autograd's gradient accumulation adds into
        a ``.grad`` that is already there, so no parameter's cotangent outlives its addition — a functional VJP
        returns all of them at once, a shard's worth of memory (0.9 GB a stage of GPT-2 large in 4) beside the
        output. Returns the carry's cotangents (zeros where the outputs do not depend on it; None on stage 0)."""
        c, q = self._leaves(carry, p)
        with torch.enable_grad():
            out = f(c, q)
        pairs = [(o, g) for o, g in (zip(out.values(), (cotangent[k] for k in out)) if isinstance(out, dict)
                                     else [(out, cotangent)]) if o.requires_grad]
        return self._backward_into([o for o, _ in pairs], [g for _, g in pairs], c, q, out_id)

    def _leaves(self, carry: dict[str, Tensor], p: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The carry (stage 0: as it is, it holds no floats to differentiate) and the parameters as fresh leaves."""
        c = carry if self.stage == 0 else {k: t.detach().requires_grad_() for k, t in carry.items()}
        return c, {n: t.detach().requires_grad_() for n, t in p.items()}

    def _backward_into(self, roots: list[Tensor], cotangents: list[Any], c: dict[str, Tensor],
                       q: dict[str, Tensor], out_id: int) -> dict[str, Tensor] | None:
        """``backward(roots, cotangents)`` into the leaves (c, q): each parameter's cotangent is added into its
        target (:meth:`_cotangent_targets`) as the pass reaches it — autograd accumulates into a ``.grad`` that is
        already there. Returns the carry's cotangents (zeros where the roots do not depend on it; None on stage 0)."""
        targets = self._cotangent_targets(out_id)
        for n, leaf in q.items():
            leaf.grad = targets[n]
        if roots:
            torch.autograd.backward(roots, cotangents, inputs=[*q.values(), *(() if self.stage == 0 else c.values())])
        for n, leaf in q.items():  # accumulation is in place when the gradient exists; should it not be, copy
            if leaf.grad is not targets[n]:
                targets[n].copy_(leaf.grad)
        if self.stage == 0:
            return None
        return {k: torch.zeros_like(t) if t.grad is None else t.grad for k, t in c.items()}

    def _hvp_into(self, f: Any, carry: dict[str, Tensor], cdot: dict[str, Tensor], p: dict[str, Tensor], g: Any,
                  gdot: Any, out_id: int) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """The stage's part of a Hessian product by reverse over reverse (module docstring): (g_c, g_θ) = vjp(f)(g)
        with its graph, then a second backward of S = ⟨g_θ, v⟩ + ⟨g_c, ċ⟩ + ⟨f, ġ⟩, whose ∂S/∂θ = ġ_θ goes into
        vectors[out_id] (owned) and ``tied_out`` (tied). S is not formed: the second pass starts at its terms with
        their cotangents (v, ċ, ġ). g_θ's values are freed as the first pass makes them
        (:func:`~curvdist.operators.cotangents.gradient_edges`) and each contribution to ġ_θ is added into the
        output as it is made (:func:`~curvdist.operators.cotangents.accumulating_into`), so neither waits a shard's
        worth. Returns (ġ_c, g_c), the carry's cotangent and its tangent (zeros where f does not depend on it; None
        on stage 0)."""
        first = self.stage == 0
        c, q = self._leaves(carry, p)
        leaves = [*q.values(), *(() if first else c.values())]
        with torch.enable_grad():
            out = f(c, q)
            if isinstance(out, dict):
                pairs = [(o, g[k], gdot[k]) for k, o in out.items() if o.requires_grad]
            else:
                pairs = [(out, g, gdot)] if out.requires_grad else []
            if not pairs:
                gcdot = self._backward_into([], [], c, q, out_id)
                return gcdot, gcdot
            # the cotangents require grad so that torch marks every backward that is once_differentiable (it does
            # so only where the incoming gradient requires grad), which accumulating_into then refuses
            with gradient_edges(q, self._tangents(self._current_v)) as primal:
                gcs = torch.autograd.grad([o for o, _, _ in pairs], leaves,
                                          [w.detach().requires_grad_() for _, w, _ in pairs],
                                          create_graph=True, allow_unused=True)[len(q):]
        carried = [(gr, cdot[k]) for k, gr in zip(c, gcs) if gr is not None and gr.requires_grad]
        roots = [*(e for e, _ in primal), *(o for o, _, _ in pairs), *(gr for gr, _ in carried)]
        cotangents = [*(d for _, d in primal), *(w for _, _, w in pairs), *(d for _, d in carried)]
        gc = None if first else {k: torch.zeros_like(t) if gr is None else gr.detach()
                                 for (k, t), gr in zip(c.items(), gcs)}
        del out, pairs, carried, gcs
        targets = self._cotangent_targets(out_id)
        with accumulating_into([r.node if isinstance(r, GradientEdge) else r.grad_fn for r in roots],
                               {leaf: targets[n] for n, leaf in q.items()}):
            torch.autograd.backward(roots, cotangents, inputs=leaves)
        for n, leaf in q.items():  # a root that is the parameter itself reaches its .grad directly
            if leaf.grad is not None:
                targets[n].add_(leaf.grad)
        if first:
            return None, gc
        return {k: torch.zeros_like(t) if t.grad is None else t.grad for k, t in c.items()}, gc

    def _cotangent_targets(self, out_id: int) -> dict[str, Tensor]:
        """Where each differentiated parameter's cotangent goes: the owned ones to their views of vectors[out_id],
        the tied ones to their parts in ``tied_out``."""
        return {**self._pieces(out_id), **{n: self.tied_out[n] for n in self.foreign}}

    # ------------------------------------------------------------------ loss and gradient (training)
    def grad_begin(self, out_id: int, epoch: int | None = None) -> None:
        """Start a gradient into vectors[out_id]; ``epoch``: write snapshot ``epoch`` first."""
        if epoch is not None:
            self._snapshot(epoch, background=True)  # written while the passes compute; waited for in finish
        self._set(out_id, torch.zeros(self.dim, dtype=self.dtype, device=self.device))
        self.tied_out = {n: torch.zeros_like(self.values[n]) for n in self.foreign}

    def grad_forward(self, b: int, incoming: Any, keep: bool = True) -> Any:
        """The forward pass of micro-batch b without tangents; the last stage returns the sum of its loss terms
        and, with ``keep``, holds ∂ℓ/∂f for :meth:`grad_backward` (the other stages recompute their forward
        there, as activation checkpointing does)."""
        self._maybe_fail()
        t0 = time.perf_counter()
        X, y = self.batches[b]
        key = self.program.signature(X)
        carry, const = split_floats(self.program.first_carry(X)) if self.stage == 0 else incoming
        p = {n: self.values[n] for n in self._diff()}
        with self._in_torch(b, "forward pass"), torch.no_grad():
            out = self._fn(key, const)(carry, p)
        if self.last:
            loss = float(self.loss.per_sample(out, y).sum())
            if keep:
                with self._in_torch(b, "loss gradient"):
                    g = torch.func.grad(lambda o: self.loss.per_sample(o, y).sum())(out)
                self.grad_saved[b] = (carry, const, key, None, g)
            self.busy += time.perf_counter() - t0
            return loss
        fo, co = split_floats(out)
        if keep:
            self.grad_saved[b] = (carry, const, key, list(fo))
        self.busy += time.perf_counter() - t0
        return fo, co

    def grad_backward(self, b: int, incoming: Any, out_id: int, scale: float | None = None,
                      parts: list[Any] | None = None) -> Any:
        """The VJP of micro-batch b: adds this stage's part of ∂ℓ/∂θ to vectors[out_id] and returns the
        cotangent of its incoming carry. With ``scale`` (the step's last micro-batch) it also runs :meth:`finish`
        and returns (cotangent, this stage's part of ‖∂L/∂θ‖²), as :meth:`backward` does."""
        return self._finished(self._grad_backward(b, incoming, out_id), out_id, scale, parts)

    def _grad_backward(self, b: int, incoming: Any, out_id: int) -> Any:
        self._maybe_fail()
        t0 = time.perf_counter()
        carry, const, key, float_out, *rest = self.grad_saved.pop(b)
        g = rest[0] if self.last else incoming
        p = {n: self.values[n] for n in self._diff()}
        with self._in_torch(b, "gradient's backward pass"):
            gc = self._vjp_into(self._fn(key, const, float_out), carry, p, g, out_id)
        self.busy += time.perf_counter() - t0
        return None if self.stage == 0 else gc

    # ------------------------------------------------------------------ parameter updates (training)
    def optimizer_step(self, gid: int, kind: str, options: dict[str, Any], version: int) -> None:
        """One step of a stage-local torch optimizer (``sgd``, ``adam``, ``adamw``: elementwise, so the stages'
        steps are the whole model's) on the owned parameters, with the gradient shard vectors[gid]; ``version``:
        the number of updates the coordinator has made (see :meth:`param_version`)."""
        self._check_version(version)
        if self.optimizer is None:
            cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
            self.optimizer = cls([self.values[n] for n in self.names], **options)
        for n, g in self._pieces(gid).items():  # views of the gradient shard, not copies (a shard's worth less)
            self.values[n].grad = g
        self.optimizer.step()
        for n in self.names:
            self.values[n].grad = None
        self.version += 1

    def add_to_params(self, vid: int, alpha: float, version: int) -> None:
        """θ_s ← θ_s + α·vectors[vid] on the owned parameters."""
        self._check_version(version)
        self.version += 1
        for n, d in self._pieces(vid).items():
            self.values[n].add_(d, alpha=alpha)

    def param_version(self) -> int:
        """The number of parameter updates this stage has made (0 after a restart: it rebuilt the initial
        parameters from the spec)."""
        return self.version

    def _check_version(self, version: int) -> None:
        if version != self.version:
            raise ClusterError(f"stage {self.stage} holds the parameters of update {self.version}, the pipeline is "
                               f"at update {version}: it was restarted and rebuilt its initial parameters; restart "
                               f"the run from a checkpoint")

    def param_value(self, name: str) -> wire.Packed:
        return wire.pack(self.values[name])

    def set_param_value(self, name: str, value: wire.Packed | Tensor) -> None:
        """Update the copy of a tied parameter (after its owner's step)."""
        self.values[name].copy_(wire.unpack(value, self.values[name].device).to(self.values[name].dtype))

    def params_flat(self) -> Tensor:
        """The owned parameters, flat, in the shard's order."""
        return torch.cat([self.values[n].reshape(-1) for n in self.names]).cpu()

    def tied_contributions(self) -> dict[str, wire.Packed]:
        """This stage's parts of C v for the tied parameters it uses but does not own (packed, :mod:`.wire`)."""
        return wire.pack_all(self.tied_out)

    def _finished(self, cotangents: Any, out_id: int, scale: float | None, parts: list[Any] | None) -> Any:
        """A backward call's result: the cotangents, or on the last micro-batch (``scale`` given) the cotangents and
        :meth:`finish`'s part of ‖out‖²."""
        return cotangents if scale is None else (cotangents, self.finish(out_id, scale, parts or []))

    def finish(self, out_id: int, scale: float, parts: list[Any]) -> float:
        """Add the later stages' parts of the tied parameters this stage owns, then scale (1/N for the mean);
        returns this stage's part of ‖out‖² (the coordinator's finiteness check, without another round of calls),
        once the snapshot that ``begin`` started is written: the coordinator drops its log when this returns."""
        import ray

        out = self.vectors[out_id]
        for name, ref in parts:
            contribution = wire.unpack((ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)[name], self.device)
            self._part(out_id, name).add_(contribution.reshape(-1).to(out.dtype))
        out.mul_(scale)
        release_free_memory()
        norm2 = self.dot(out_id, out_id)
        self._settle_writes()
        return norm2

    def _maybe_fail(self) -> None:
        self.calls += 1
        maybe_fail(self.stage, self.calls, self.restarted)

    # ------------------------------------------------------------------ time and memory
    def reset_meters(self) -> None:
        """Start a new window for the busy time and the peak resident memory."""
        self.busy = 0.0
        self.snapshot_wait_s = 0.0
        self._windowed = reset_peak(self.device)

    def meters(self) -> dict[str, Any]:
        """The busy time since :meth:`reset_meters`, the time the products' last calls waited for snapshot writes,
        the torch threads and this stage's memory record."""
        held = sum(v.numel() for v in self.values.values())
        return {"busy_s": self.busy, "snapshot_wait_s": self.snapshot_wait_s, "threads": torch.get_num_threads(),
                "memory": memory_record(f"stage {self.stage}", held, getattr(self, "_windowed", False),
                                        self.device, owned=self.dim)}

    # ------------------------------------------------------------------ metric blocks of this stage's parameters
    def metric_begin(self, kind: str, fisher_type: str = "mc") -> None:
        """Start collecting the statistics of a stage metric ``kind`` (:mod:`.stage_blocks`)."""
        from .stage_blocks import StageBlocks

        self.blocks = StageBlocks(self.program, self.values, self.names, list(self.foreign),
                                  [n for n, _ in self.tied_users], kind, fisher_type)

    def metric_correction_begin(self, scale: float, num_samples: int, *parts: Any) -> None:
        """EKFAC: the factors and bases of this stage's weights from the first pass (with the later stages' sums of
        the tied weights it owns); the next pass collects the corrected eigenvalues."""
        self.blocks.begin_correction(scale, num_samples, parts)

    def metric_forward(self, b: int, incoming: Any) -> Any:
        X = self.batches[b][0]
        return self.blocks.forward(b, X, incoming, self.program.signature(X))

    def metric_start(self, b: int, out: Tensor, mc_samples: int, seed: int) -> Tensor:
        from ..geometry.blocks.kronecker import block_output_factors

        return block_output_factors(self.loss, out, self.batches[b][1], self.blocks.kind, self.firsts[b],
                                    mc_samples, seed, self.blocks.out_kind if self.blocks.kind == "ekfac" else None)

    def metric_backward(self, b: int, grads_out: Any, *parts: dict[str, Tensor]) -> Any:
        return self.blocks.backward(b, grads_out, parts)

    def metric_tied_samples(self, b: int) -> dict[str, Tensor]:
        return self.blocks.tied_samples(b)

    def metric_tied_sums(self) -> Any:
        return self.blocks.tied_sums()

    def metric_finish(self, mid: int, scale: float, num_samples: int, damping: float, *parts: Any) -> float:
        """Form the blocks collected since :meth:`metric_begin` as metric ``mid``; returns their log det."""
        logdet = self.blocks.finish(scale, num_samples, damping, parts)
        self.metrics[mid] = self.blocks.metric
        self.blocks = None
        release_free_memory()
        return logdet

    def metric_apply(self, mid: int, out: int, vid: int, method: str) -> None:
        """vectors[out] = ``method`` of this stage's blocks of metric ``mid`` (``apply``, ``apply_undamped``,
        ``solve``, ``inv_factor_apply``, ``inv_factor_t_apply``, ``inv_sqrt_apply``) applied to vectors[vid]."""
        if method not in METRIC_METHODS:
            raise MetricError(f"unknown metric method {method!r}; one of {METRIC_METHODS}")
        if mid not in self.metrics:
            raise MetricError(f"stage {self.stage} holds no blocks of this metric: the stage was restarted after "
                              f"the metric was built, or the metric was released; build the metric again")
        self._set(out, getattr(self.metrics[mid], method)(self.vectors[vid]))

    def metric_release(self, mid: int) -> None:
        self.metrics.pop(mid, None)
