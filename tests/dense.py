"""Independent dense float64 ground truth: explicit Hessians, Jacobians and per-sample gradients.

Computed with plain ``torch.autograd`` (double backward, one row at a time), not with ``torch.func``: independent
of curvdist's implementation (and of torch.func's batching rules: with torch 2.13, ``torch.func.hessian`` and
``jacrev(jacrev)`` of the transformer case give an asymmetric, wrong matrix where plain autograd is exact).
The losses are written out again from their definitions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def flat_params(model: nn.Module) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    named = list(model.named_parameters())
    return torch.cat([p.detach().reshape(-1) for _, p in named]), [(n, p.shape) for n, p in named]


def _unflat(theta: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, s in layout:
        k = s.numel()
        out[n] = theta[i : i + k].view(s)
        i += k
    return out


def outputs_fn(model: nn.Module, X: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    theta, layout = flat_params(model)
    buffers = dict(model.named_buffers())

    def f(th: Tensor) -> Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(model, {**_unflat(th, layout), **buffers}, (X,))

    return f, theta


def autograd_jacobian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∂f/∂x with shape (*f.shape, *x.shape), one backward pass per output entry."""
    x = x.detach().requires_grad_(True)
    out = f(x)
    flat = out.reshape(-1)
    rows = [torch.autograd.grad(flat[i], x, retain_graph=True, allow_unused=True)[0] for i in range(flat.numel())]
    rows = [torch.zeros_like(x) if r is None else r for r in rows]
    return torch.stack(rows).reshape(*out.shape, *x.shape)


def autograd_hessian(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇²f(x) of a scalar f by double backward, one row at a time."""
    x = x.detach().requires_grad_(True)
    g = torch.autograd.grad(f(x), x, create_graph=True)[0].reshape(-1)
    rows = [torch.autograd.grad(g[i], x, retain_graph=True, allow_unused=True)[0] for i in range(g.numel())]
    return torch.stack([torch.zeros_like(x) if r is None else r for r in rows]).reshape(g.numel(), -1)


def per_sample_loss(loss: str, out: Tensor, y: Tensor) -> Tensor:
    if loss == "cross_entropy":
        return -(out.log_softmax(-1).gather(-1, y[:, None])[:, 0])
    return ((out - y) ** 2).sum(-1)


def scale(reduction: str, n: int) -> float:
    return 1.0 / n if reduction == "mean" else 1.0


def dense_hessian(model: nn.Module, loss: str, X: Tensor, y: Tensor, reduction: str) -> Tensor:
    f, theta = outputs_fn(model, X)
    s = scale(reduction, len(X))
    return autograd_hessian(lambda th: s * per_sample_loss(loss, f(th), y).sum(), theta)


def output_hessians(loss: str, out: Tensor, y: Tensor) -> Tensor:
    """∂²ℓ_n/∂f_n² for every sample, by autodiff of the written-out loss: (N, C, C)."""
    return torch.stack([autograd_hessian(lambda o: per_sample_loss(loss, o[None], y[n : n + 1]).sum(), out[n])
                        for n in range(len(out))])


def dense_ggn(model: nn.Module, loss: str, X: Tensor, y: Tensor, reduction: str) -> Tensor:
    f, theta = outputs_fn(model, X)
    J = autograd_jacobian(f, theta)  # (N, C, d)
    Lam = output_hessians(loss, f(theta).detach(), y)
    return scale(reduction, len(X)) * torch.einsum("nci,ncd,ndj->ij", J, Lam, J)


def per_sample_grads(model: nn.Module, loss: str, X: Tensor, y: Tensor) -> Tensor:
    f, theta = outputs_fn(model, X)
    return autograd_jacobian(lambda th: per_sample_loss(loss, f(th), y), theta)  # (N, d)


def dense_fisher_by_enumeration(model: nn.Module, X: Tensor, y: Tensor, reduction: str) -> Tensor:
    """Type-2 Fisher of cross-entropy from its definition: Σ_n Σ_c p_nc ∇ℓ(f_n, c)∇ℓ(f_n, c)ᵀ."""
    f, theta = outputs_fn(model, X)
    p = f(theta).detach().softmax(-1)
    F = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for c in range(p.shape[1]):
        G = per_sample_grads(model, "cross_entropy", X, torch.full_like(y, c))
        F += torch.einsum("n,ni,nj->ij", p[:, c], G, G)
    return scale(reduction, len(X)) * F


def dense_empirical_fisher(model: nn.Module, loss: str, X: Tensor, y: Tensor, reduction: str) -> Tensor:
    G = per_sample_grads(model, loss, X, y)
    return scale(reduction, len(X)) * G.T @ G


def dense_blocks(problem, kind: str = "ggn", **options: object) -> dict[str, Tensor]:
    """The diagonal blocks, one per parameter, of the dense matrix of curvdist's operator ``kind`` (whose products
    are themselves checked against this module's autograd truth)."""
    import curvdist as cd

    C = cd.operator(problem, kind, **options).to_dense()
    out, i = {}, 0
    for name, shape in zip(problem.param_names, problem.shapes):
        k = shape.numel()
        out[name] = C[i:i + k, i:i + k]
        i += k
    return out


def kronecker_blocks(M: object) -> dict[str, Tensor]:
    """The undamped dense blocks of a Kronecker-factored metric, by parameter name."""
    return {b.name: b.dense(0.0) for b in M.blocks}  # type: ignore[attr-defined]
