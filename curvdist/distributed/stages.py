"""Pipeline mode: the model split into consecutive stages, stage i on actor i with only its own parameters.

Splitting: an ``nn.Sequential`` (or a model whose ``stages()`` returns a list of modules) is cut into S
consecutive groups with near-equal parameter counts (:func:`split_points`).

Products, for one batch, with v sharded as (v_0, …, v_{S−1}) by stage:

* GGN/Fisher: forward, stage i computes (a_i, ȧ_i) = jvp(f_i, (a_{i−1}, θ_i), (ȧ_{i−1}, v_i)); the last stage
  applies the loss Hessian, u = Λ ȧ; backward, stage i maps u through vjp(f_i)(u) = (u_x, u_θ) and keeps u_θ.
* Hessian: the same forward pass; the last stage starts the gradient and its directional derivative,
  (g, ġ) = (∂ℓ/∂f, ∂²ℓ/∂f² ḟ); backward, stage i takes the JVP of the VJP,
  jvp((x, θ, g) ↦ vjp(f_i)(g), (a_{i−1}, θ_i, g), (ȧ_{i−1}, v_i, ġ)) = ((g_x, g_θ), (ġ_x, ġ_θ)),
  keeps ġ_θ (its shard of H v) and passes (g_x, ġ_x) on — forward-over-reverse, stage by stage.

Activations and tangents travel actor to actor through Ray's object store (the coordinator passes ObjectRefs);
vectors live on the stage actors as shards and the coordinator sees only scalars (:class:`ShardedSpace`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from ..errors import ProblemError
from ..faults import maybe_fail
from ..problem.autodiff import differentiable_kernels
from ..problem.data import as_batches
from ..problem.losses import make_loss
from ..problem.spec import ProblemSpec
from ..solvers.space import random_flat


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The consecutive pieces a model can be split into."""
    if hasattr(model, "stages") and callable(model.stages):
        mods = list(model.stages())
    elif isinstance(model, nn.Sequential):
        mods = list(model)
    else:
        raise ProblemError(
            f"pipeline mode needs an nn.Sequential or a model with a stages() method listing its consecutive "
            f"modules; {type(model).__name__} is neither"
        )
    if not mods:
        raise ProblemError("the model has no modules to split into stages")
    return mods


def split_points(model: nn.Module, stages: int) -> list[tuple[int, int]]:
    """[start, stop) module ranges of ``stages`` consecutive stages with near-equal parameter counts; every stage
    gets at least one module with parameters."""
    mods = stage_modules(model)
    counts = np.array([sum(p.numel() for p in m.parameters()) for m in mods])
    with_params = int((counts > 0).sum())
    if not isinstance(stages, int) or stages < 1:
        raise ProblemError(f"stages must be a positive integer, got {stages!r}")
    if stages > with_params:
        raise ProblemError(f"cannot split into {stages} stages: the model has only {with_params} modules with "
                           "parameters")
    total = counts.sum()
    cum = np.cumsum(counts)
    cuts, start = [], 0
    for s in range(1, stages):
        target = total * s / stages
        i = int(np.searchsorted(cum, target))  # first module index whose cumulative count reaches the target
        # keep at least one parametrized module in this stage and leave enough for the rest
        lo = next(j for j in range(start, len(mods)) if counts[j] > 0)
        remaining_after = lambda j: int((counts[j + 1:] > 0).sum())  # noqa: E731
        i = max(i, lo)
        while remaining_after(i) < stages - s:
            i -= 1
        cuts.append(i + 1)
        start = i + 1
    bounds = [0, *cuts, len(mods)]
    return [(bounds[k], bounds[k + 1]) for k in range(stages)]


class StageWorker:
    """Stage ``stage`` of ``stages``: its modules, its parameters, the data (inputs for the first stage, targets
    for the last), and a store of vector shards keyed by integer ids."""

    def __init__(self, spec: ProblemSpec, stage: int, stages: int) -> None:
        import ray

        self.stage, self.stages = stage, stages
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = spec.build_model(device)
        a, b = split_points(model, stages)[stage]
        self.module = nn.Sequential(*stage_modules(model)[a:b]).eval()
        del model
        named = dict(self.module.named_parameters())
        self.names = list(named)
        self.params = tuple(p.detach() for p in named.values())
        self.buffers = {k: v.detach() for k, v in self.module.named_buffers()}
        self.shapes = [p.shape for p in self.params]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = getattr(torch, spec.dtype), torch.device(device)
        self.batches = [(X.to(device, self.dtype) if X.is_floating_point() else X.to(device),
                         y.to(device, self.dtype) if y.is_floating_point() else y.to(device))
                        for X, y in as_batches(spec.build_data(), spec.batch_size)]
        self.loss = make_loss(spec.loss)
        self.vectors: dict[int, Tensor] = {}
        self.saved: dict[int, Any] = {}
        self.calls = 0
        self.restarted = bool(getattr(ray.get_runtime_context(), "was_current_actor_reconstructed", False))

    # ------------------------------------------------------------------ layout
    def info(self) -> dict[str, Any]:
        return {"dim": self.dim, "names": self.names, "samples": sum(len(y) for _, y in self.batches),
                "batches": len(self.batches)}

    def _f(self, x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
        with differentiable_kernels():
            return functional_call(self.module, {**dict(zip(self.names, params)), **self.buffers}, (x,))

    def _unflat(self, flat: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view(s) for t, s in zip(torch.split(flat, [s.numel() for s in self.shapes]), self.shapes))

    # ------------------------------------------------------------------ products
    def forward(self, b: int, x: Any, xdot: Any, vid: int) -> tuple[Tensor, Tensor]:
        """(a_i, ȧ_i) for batch b; the first stage reads its inputs, later stages take the previous outputs."""
        self._maybe_fail()
        if self.stage == 0:
            x = self.batches[b][0]
            xdot = torch.zeros_like(x) if x.is_floating_point() else None
        v = self._unflat(self.vectors[vid])
        if xdot is None:  # integer inputs (token ids): no tangent through them
            out, outdot = jvp(lambda p: self._f(x, p), (self.params,), (v,))
        else:
            out, outdot = jvp(self._f, (x, self.params), (xdot, v))
        self.saved[b] = (x, xdot)
        return out.detach(), outdot.detach()

    def loss_start(self, b: int, out: Tensor, outdot: Tensor, kind: str) -> tuple[Any, Tensor]:
        """At the last stage: (g, ġ) = (∂ℓ/∂f, Λ ḟ) for the Hessian; (None, Λ ḟ) for the GGN."""
        y = self.batches[b][1]
        lam_v = self.loss.output_hessian_apply(out, y, outdot)
        if kind == "hessian":
            g = torch.func.grad(lambda o: self.loss.per_sample(o, y).sum())(out)
            return g, lam_v
        return None, lam_v

    def backward(self, b: int, g: Any, gdot: Tensor, kind: str, out_id: int) -> tuple[Any, Any]:
        """Stage VJP (GGN) or JVP-of-VJP (Hessian); accumulates this stage's shard of C v into ``out_id``."""
        self._maybe_fail()
        x, xdot = self.saved.pop(b)
        need_x = self.stage > 0 and x.is_floating_point()
        if kind == "hessian":
            v = self._unflat(self.vectors[self._current_v])
            if need_x:
                def h(xx: Tensor, p: tuple[Tensor, ...], gg: Tensor) -> tuple[Any, ...]:
                    return vjp(self._f, xx, p)[1](gg)

                (gx, _), (gxdot, gpdot) = jvp(h, (x, self.params, g), (xdot, v, gdot))
            else:
                def h0(p: tuple[Tensor, ...], gg: Tensor) -> tuple[Tensor, ...]:
                    return vjp(lambda q: self._f(x, q), p)[1](gg)[0]

                _, gpdot = jvp(h0, (self.params, g), (v, gdot))
                gx = gxdot = None
            part = torch.cat([t.reshape(-1) for t in gpdot])
        else:
            if need_x:
                gxdot, gp = vjp(self._f, x, self.params)[1](gdot)
            else:
                gp = vjp(lambda q: self._f(x, q), self.params)[1](gdot)[0]
                gxdot = None
            gx = None
            part = torch.cat([t.reshape(-1) for t in gp])
        acc = self.vectors.get(out_id)
        self.vectors[out_id] = part.detach() if acc is None else acc + part.detach()
        return (None if gx is None else gx.detach()), (None if gxdot is None else gxdot.detach())

    def begin(self, vid: int, out_id: int) -> None:
        self._current_v = vid
        self.vectors[out_id] = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def scale_result(self, out_id: int, s: float) -> None:
        self.vectors[out_id].mul_(s)

    def _maybe_fail(self) -> None:
        self.calls += 1
        maybe_fail(self.stage, self.calls, self.restarted)

    # ------------------------------------------------------------------ Kronecker blocks of this stage's layers
    def kfac_forward(self, b: int, x: Any) -> Tensor:
        from .stage_blocks import StageBlocks

        if getattr(self, "blocks", None) is None:
            self.blocks = StageBlocks(self.module, self.names, self.shapes)
        return self.blocks.forward(b, self.batches[b][0] if self.stage == 0 else x, self.stage == 0)

    def kfac_start(self, b: int, out: Tensor, kind: str, mc_samples: int, seed: int) -> Tensor:
        from .stage_blocks import output_vectors

        return output_vectors(self.loss, out, self.batches[b][1], kind, b, mc_samples, seed)

    def kfac_backward(self, b: int, grads_out: Tensor) -> Tensor | None:
        return self.blocks.backward(b, grads_out)

    def kfac_finish(self, scale: float, num_samples: int, damping: float, kind: str) -> float:
        return self.blocks.finish(scale, num_samples, damping, kind)

    def kfac_power(self, out: int, vid: int, exponent: float, damped: bool) -> None:
        """vectors[out] = (this stage's blocks of M (+ δI))^exponent · vectors[vid]."""
        M = self.blocks.metric
        self.vectors[out] = M._power(self.vectors[vid], exponent, M.damping if damped else 0.0)

    # ------------------------------------------------------------------ vector shards
    def put(self, i: int, t: Tensor) -> None:
        self.vectors[i] = t.to(self.device, self.dtype)

    def get(self, i: int) -> Tensor:
        return self.vectors[i].cpu()

    def free(self, ids: list[int]) -> None:
        for i in ids:
            self.vectors.pop(i, None)

    def dot(self, a: int, b: int) -> float:
        return float(torch.dot(self.vectors[a].double(), self.vectors[b].double()))

    def dots(self, ids: list[int], b: int) -> list[float]:
        y = self.vectors[b].double()
        return [float(torch.dot(self.vectors[i].double(), y)) for i in ids]

    def axpy(self, out: int, a: float, x: int, y: int) -> None:
        self.vectors[out] = torch.add(self.vectors[y], self.vectors[x], alpha=a)

    def scale(self, out: int, a: float, x: int) -> None:
        self.vectors[out] = self.vectors[x] * a

    def mul(self, out: int, x: int, y: int) -> None:
        self.vectors[out] = self.vectors[x] * self.vectors[y]

    def zeros(self, out: int) -> None:
        self.vectors[out] = torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def random(self, out: int, seed: int, kind: str, offset: int, total: int) -> None:
        """This stage's slice of the layout-independent random vector of ``seed`` (same numbers as locally)."""
        self.vectors[out] = random_flat(total, seed, kind, self.dtype)[offset:offset + self.dim].to(self.device)

    def lincomb(self, out: int, coeffs: list[float], ids: list[int]) -> None:
        acc = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for c, i in zip(coeffs, ids):
            acc += c * self.vectors[i].double()
        self.vectors[out] = acc.to(self.dtype)
