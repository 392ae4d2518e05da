"""Diagonal curvature metrics computed with BackPACK (Dangel, Kunstner & Hennig, "BackPACK: Packing more into
backprop", ICLR 2020).

All metrics refer to the problem's empirical risk L(θ) = s · Σ_n ℓ(f(x_n; θ), y_n) (s = 1/N for
reduction="mean", s = 1 for "sum", N the size of the whole data set) and its selected parameters θ:

* :func:`diag_ggn`              diag(G),   G = s · Σ_n J_nᵀ Λ_n J_n   (J_n = ∂f_n/∂θ, Λ_n = ∂²ℓ_n/∂f_n²)
* :func:`diag_fisher_mc`        diag(G̃),  G̃ = s · Σ_n (1/S) Σ_k J_nᵀ g̃_nk g̃_nkᵀ J_n with g̃_nk = ∇_f ℓ(f_n, ỹ_nk),
                                 ỹ_nk ~ p(y | f_n) (S = mc_samples); E[G̃] = G for both built-in losses
* :func:`empirical_fisher_diag` diag(s · Σ_n g_n g_nᵀ),  g_n = ∇_θ ℓ_n

Each is returned as a :class:`~curvdist.geometry.metrics.base.DiagonalMetric` M_δ = diag(d) + δI, or
diag(d) + δ·diag(r) with ``damping_diagonal=r`` (the θ-identity pulled back to ψ, r = diag(JᵀJ), for a diagonal J;
:mod:`curvdist.geometry.damping`).

A diagonal metric transforms as a tensor (M_ψ = Jᵀ M_θ J) only under reparametrizations θ = φ(ψ) with a diagonal
Jacobian (elementwise maps, per-layer scalings such as the NTK parametrization); under any other reparametrization
the diagonal of the transformed matrix is not the transformed diagonal, and M⁻¹-based quantities lose their
invariance.

How BackPACK is driven (the conventions were checked against BackPACK 1.7.1's source and against dense float64
ground truth in ``tests/geometry/metrics/test_metrics_backpack.py``):

* BackPACK runs on its own ``backpack.extend``-ed deep copy of the model; the user's model is never extended or
  written to. Parameters that are not selected are frozen (``requires_grad=False``) in the copy.
* Every batch uses a *sum*-reduction loss module (``CrossEntropyLoss(reduction="sum")`` is Σ_n −log softmax(f_n)_y,
  ``MSELoss(reduction="sum")`` is Σ_n ‖f_n − y_n‖²: exactly the problem's per-sample losses). BackPACK then returns
  the unscaled sums Σ_{n ∈ batch}; they are accumulated over ``problem.batches()`` and multiplied by s once at the
  end, so the result does not depend on how the data are batched. (BackPACK's own "mean" convention divides by the
  batch size, and for MSE by batch size × output dimension, which is not the problem's 1/N.)
* BackPACK silently skips the parameters of layers it has no rule for (LayerNorm, attention, a model's own
  parameters such as a positional embedding). The selected parameters are checked *before* the pass (the layer
  that owns each one must be supported) and *after* it (each must have received a result).
* BackPACK ignores ``padding_mode`` of convolutions and silently returns wrong values for ``circular``/``reflect``/
  ``replicate`` padding; such convolutions are refused.
* BackPACK has no second-order rule for the ``Softplus``, ``GELU`` and ``SiLU`` activations (and its Kronecker
  extensions none for ``ELU``, ``SELU`` and ``LeakyReLU``); this module supplies them (the GGN needs only the
  elementwise derivative f'(x)).
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import MetricError
from ...problem.data import batch_len
from ...problem.outputs import call
from ...problem.problem import Problem
from .base import DiagonalMetric

__all__ = ["diag_ggn", "diag_fisher_mc", "empirical_fisher_diag"]

#: suggestion appended to errors about layers BackPACK cannot handle
MATRIX_FREE_HINT = "use a matrix-free metric ('ggn' or 'fisher'), which works for any model"


# ====================================================================== activations BackPACK lacks
def _elementwise_derivatives_class() -> type:
    """Build the derivative classes lazily so that importing curvdist does not import BackPACK."""
    from backpack.core.derivatives.elementwise import ElementwiseDerivatives
    from backpack.utils.subsampling import subsample

    class _ActivationDerivatives(ElementwiseDerivatives):
        """f'(x) and f''(x) of an elementwise activation from closed forms in terms of the module input."""

        def hessian_is_zero(self, module: nn.Module) -> bool:
            return False

        def df(self, module: nn.Module, g_inp: tuple[Tensor, ...], g_out: tuple[Tensor, ...],
               subsampling: list[int] | None = None) -> Tensor:
            return activation_derivatives(module, subsample(module.input0, subsampling=subsampling))[0]

        def d2f(self, module: nn.Module, g_inp: tuple[Tensor, ...], g_out: tuple[Tensor, ...]) -> Tensor:
            return activation_derivatives(module, module.input0)[1]

    return _ActivationDerivatives


def activation_derivatives(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(f'(x), f''(x)) of a ``Softplus``, ``GELU`` (exact or tanh approximation) or ``SiLU`` module, elementwise."""
    if isinstance(module, nn.Softplus):
        beta, threshold = float(module.beta), float(module.threshold)
        z = beta * x
        sig = torch.sigmoid(z)
        linear = z > threshold  # torch's softplus is the identity there
        d1 = torch.where(linear, torch.ones_like(x), sig)
        d2 = torch.where(linear, torch.zeros_like(x), beta * sig * (1 - sig))
        return d1, d2
    if isinstance(module, nn.SiLU):
        sig = torch.sigmoid(x)
        return sig * (1 + x * (1 - sig)), sig * (1 - sig) * (2 + x * (1 - 2 * sig))
    if isinstance(module, nn.GELU):
        if module.approximate == "tanh":
            k, c = math.sqrt(2.0 / math.pi), 0.044715
            t = torch.tanh(k * (x + c * x**3))
            du = k * (1 + 3 * c * x**2)
            d2u = 6 * k * c * x
            sech2 = 1 - t**2
            d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
            d2 = sech2 * du + 0.5 * x * (sech2 * d2u - 2 * t * sech2 * du**2)
            return d1, d2
        pdf = torch.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        return cdf + x * pdf, pdf * (2 - x**2)
    raise MetricError(f"no derivative rule for {type(module).__name__}")


def add_activation_support(extension: Any) -> Any:
    """Register Softplus/GELU/SiLU (and, for the Kronecker extensions, ELU/SELU/LeakyReLU) on a BackPACK
    second-order extension instance where BackPACK itself has no rule. Returns the extension."""
    from backpack.extensions.secondorder.diag_ggn import DiagGGN
    from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
    from backpack.extensions.secondorder.hbp import HBP
    from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule

    if isinstance(extension, DiagGGN):
        wrap: Callable[[Any], Any] = DiagGGNBaseModule
    elif isinstance(extension, HBP):
        wrap = HBPBaseModule
    else:
        return extension
    derivs = _elementwise_derivatives_class()()
    rules: dict[type[nn.Module], Any] = {nn.Softplus: derivs, nn.GELU: derivs, nn.SiLU: derivs}
    if isinstance(extension, HBP):
        from backpack.core.derivatives.elu import ELUDerivatives
        from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
        from backpack.core.derivatives.selu import SELUDerivatives

        rules.update({nn.ELU: ELUDerivatives(), nn.SELU: SELUDerivatives(), nn.LeakyReLU: LeakyReLUDerivatives()})
    supported = supported_modules(extension)
    for cls, d in rules.items():
        if supported is None or cls not in supported:
            try:
                extension.set_module_extension(cls, wrap(derivatives=d))
            except ValueError:  # already has a rule
                pass
    return extension


def supported_modules(extension: Any) -> set[type[nn.Module]] | None:
    """The module classes a BackPACK extension has rules for (BackPACK looks them up by exact class);
    ``None`` if this BackPACK version hides the table."""
    table = getattr(extension, "_BackpropExtension__module_extensions", None)
    return set(table) if isinstance(table, dict) else None


# ====================================================================== the BackPACK pass
def backpack_loss(problem: Problem) -> bool:
    """Whether BackPACK has the problem's loss: curvdist's own ``cross_entropy`` or ``mse`` (not a subclass, whose
    per-sample loss may differ)."""
    from ...problem.losses import CrossEntropy, MeanSquaredError

    return type(problem.loss) in (CrossEntropy, MeanSquaredError)


def loss_module(problem: Problem) -> nn.Module:
    """The sum-reduction torch loss module matching the problem's per-sample loss."""
    name = getattr(problem.loss, "name", None)
    if backpack_loss(problem) and name == "cross_entropy":
        return nn.CrossEntropyLoss(reduction="sum")
    if backpack_loss(problem) and name == "mse":
        return nn.MSELoss(reduction="sum")
    raise MetricError(f"BackPACK metrics support curvdist's 'cross_entropy' and 'mse' losses, not "
                      f"{type(problem.loss).__name__} ({name!r}); use backend 'torch' or 'auto' (curvdist's own "
                      f"kernels take every loss), or {MATRIX_FREE_HINT}")


def owner_path(param_name: str) -> str:
    """The module path of the module that directly owns a parameter ('' for the root)."""
    return param_name.rpartition(".")[0]


def describe_module(path: str, module: nn.Module) -> str:
    return f"'{path}' ({type(module).__name__})" if path else f"the model itself ({type(module).__name__})"


def _check_convolutions(model: nn.Module, paths: Sequence[str] | None) -> None:
    """Refuse convolutions whose padding BackPACK would get wrong (it ignores ``padding_mode``)."""
    modules = dict(model.named_modules())
    items = modules.items() if paths is None else ((p, modules[p]) for p in paths)
    for path, m in items:
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            raise MetricError(
                f"convolution {describe_module(path, m)} uses padding_mode={m.padding_mode!r}: BackPACK ignores "
                f"padding modes and would return wrong values; {MATRIX_FREE_HINT}"
            )


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch warns when a module's input does not require grad (first layer); harmless here
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*does not have an extension for Module.*")
        yield


def backpack_pass(problem: Problem, make_extension: Callable[[], Any], savefield: str,
                  accumulate: Callable[[str, Any, int, torch.Size], None], *, metric_name: str,
                  second_order: bool, allowed: Callable[[str, nn.Module], str | None] | None = None) -> None:
    """Run one BackPACK extension over all of ``problem.batches()`` on an extended copy of the model.

    For every batch (of size B) and selected parameter ``name`` it calls ``accumulate(name, result, B, shape)``
    with the quantity BackPACK stored in ``savefield`` for the *sum*-reduction batch loss and the output shape of
    the layer that owns the parameter. The user's model is untouched.

    Args:
        make_extension: builds the BackPACK extension (one instance per batch).
        savefield: the attribute BackPACK writes on the parameters.
        metric_name: used in error messages.
        second_order: whether the extension backpropagates curvature through every layer (then every layer in
            the graph needs a rule, and convolutions anywhere in the model are checked).
        allowed: optional extra check of a selected parameter's owning module; returns a reason to refuse it.
    """
    from backpack import backpack, extend
    from backpack.context import CTX

    lossf = loss_module(problem)
    selected = set(problem.param_names)
    model = copy.deepcopy(problem.model)
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in selected)
        p.grad = None
    modules = dict(model.named_modules())

    # ---- coverage check before the pass: BackPACK skips unsupported layers silently
    supported = supported_modules(make_extension())
    refused: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for name in problem.param_names:
        path = owner_path(name)
        m = modules[path]
        reason = None
        if supported is not None and type(m) not in supported:
            reason = "not supported by BackPACK"
        elif allowed is not None:
            reason = allowed(path, m)
        if reason is not None:
            key = describe_module(path, m)
            refused.setdefault(key, []).append(name)
            reasons[key] = reason
    if refused:
        what = "; ".join(f"{k}: {reasons[k]} (parameters {v})" for k, v in refused.items())
        raise MetricError(f"the {metric_name} metric cannot cover all selected parameters: {what}. "
                          f"Deselect them (Problem(params=...)) or {MATRIX_FREE_HINT}")
    owners = sorted({owner_path(n) for n in problem.param_names})
    _check_convolutions(model, None if second_order else owners)

    # ---- count calls: BackPACK keeps one input/output per module, so a module called twice breaks it (the
    # owners of the selected parameters always; for curvature backpropagation every layer on the way)
    watched = set(owners)
    if second_order:
        watched |= {p for p, m in modules.items() if not list(m.children())}
    calls: dict[str, int] = {}
    out_shapes: dict[str, torch.Size] = {}
    handles = []
    for path in sorted(watched):
        def count(_m: nn.Module, _inp: Any, out: Any, path: str = path) -> None:
            calls[path] = calls.get(path, 0) + 1
            out_shapes[path] = out.shape if isinstance(out, Tensor) else torch.Size()
        handles.append(modules[path].register_forward_hook(count))

    n_hooks = len(CTX.hook_handles)
    extend(model)
    extend(lossf)
    try:
        for X, y in problem.batches():
            calls.clear()
            out = call(model, X)
            reused = {p: c for p, c in calls.items() if c > 1}
            if reused:
                raise MetricError(
                    f"modules {sorted(reused)} are called more than once per forward pass (shared modules); "
                    f"BackPACK's {metric_name} would be wrong for them; {MATRIX_FREE_HINT}"
                )
            loss = lossf(out, y)
            ext = make_extension()
            try:
                with _quiet(), backpack(ext):
                    loss.backward()
            except MetricError:
                raise
            except (NotImplementedError, AssertionError, ValueError) as e:
                raise MetricError(f"BackPACK cannot compute the {metric_name} metric for this model: "
                                  f"{type(e).__name__}: {e}; {MATRIX_FREE_HINT}") from e
            missing = [n for n in problem.param_names if not hasattr(named[n], savefield)]
            if missing:
                raise MetricError(f"BackPACK returned no {metric_name} result for the selected parameters "
                                  f"{missing} (their layers are not in the computation graph or not supported); "
                                  f"{MATRIX_FREE_HINT}")
            for name in problem.param_names:
                p = named[name]
                accumulate(name, getattr(p, savefield), batch_len(X), out_shapes[owner_path(name)])
                delattr(p, savefield)
                p.grad = None
    finally:
        for h in handles:
            h.remove()
        for h in CTX.hook_handles[n_hooks:]:
            h.remove()
        del CTX.hook_handles[n_hooks:]


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for the block and restore their state afterwards."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise MetricError(f"seed must be an int, got {seed!r}") from None
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    kwargs = {} if device.type == "cpu" else {"device_type": device.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(seed)
        yield


def check_mc_samples(mc_samples: int) -> int:
    try:
        n = operator.index(mc_samples)
    except TypeError:
        n = 0
    if isinstance(mc_samples, bool) or n < 1:
        raise MetricError(f"mc_samples must be a positive int, got {mc_samples!r}")
    return n


def _diagonal_values(problem: Problem, make_extension: Callable[[], Any], savefield: str, kind: str,
                     second_order: bool) -> Tensor:
    acc = {n: torch.zeros(s, dtype=problem.dtype, device=problem.device)
           for n, s in zip(problem.param_names, problem.shapes)}

    def add(name: str, value: Tensor, _batch: int, _shape: torch.Size) -> None:
        acc[name].add_(value.detach())

    backpack_pass(problem, make_extension, savefield, add, metric_name=kind, second_order=second_order)
    return problem.flatten([acc[n] for n in problem.param_names]) * problem.scale


#: the output-space factor (see curvdist.operators.output_space.output_factors) of each diagonal kind
_OWN_KIND = {"diag_ggn": "ggn", "diag_fisher_mc": "fisher_mc", "empirical_fisher_diag": "empirical"}
BACKENDS = ("auto", "backpack", "torch")


def _extension(kind: str, mc_samples: int) -> tuple[Callable[[], Any], str, bool]:
    """(extension factory, savefield, second order) of BackPACK's computation of a diagonal kind."""
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    if kind == "diag_ggn":
        return (lambda: add_activation_support(DiagGGNExact())), "diag_ggn_exact", True
    if kind == "diag_fisher_mc":
        return (lambda: add_activation_support(DiagGGNMC(mc_samples=mc_samples))), "diag_ggn_mc", True
    return SumGradSquared, "sum_grad_squared", False


def backpack_applicable(problem: Problem, make_extension: Callable[[], Any], second_order: bool,
                        allowed: Callable[[str, nn.Module], str | None] | None = None) -> bool:
    """Whether BackPACK can compute the extension for the problem: it has the loss (:func:`backpack_loss`), every
    selected parameter's owner has a rule (and passes ``allowed``) and, for curvature backpropagation, the model is
    a (nested) ``nn.Sequential`` of layers with rules — BackPACK's second-order extensions cannot follow other
    control flow — and no convolution it would get wrong (``padding_mode`` other than zeros) is involved."""
    if not backpack_loss(problem):
        return False
    supported = supported_modules(make_extension())
    if supported is None:  # pragma: no cover - BackPACK hides its table: let backpack_pass decide
        return True
    modules = dict(problem.model.named_modules())
    involved = modules.values() if second_order else [modules[owner_path(n)] for n in problem.param_names]
    if any(isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros" for m in involved):
        return False
    for name in problem.param_names:
        path = owner_path(name)
        if type(modules[path]) not in supported or (allowed is not None and allowed(path, modules[path])):
            return False
    if second_order:
        for m in modules.values():
            children = list(m.children())
            if children and type(m) is not nn.Sequential or not children and type(m) not in supported:
                return False
    return True


def resolve_backend(problem: Problem, backend: str, make_extension: Callable[[], Any], second_order: bool,
                    allowed: Callable[[str, nn.Module], str | None] | None = None) -> str:
    """``auto`` → ``backpack`` where BackPACK applies (:func:`backpack_applicable`), else ``torch`` (curvdist's own
    kernels, :mod:`curvdist.geometry.blocks`)."""
    if backend not in BACKENDS:
        raise MetricError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "backpack" if backpack_applicable(problem, make_extension, second_order, allowed) else "torch"


def raw_diagonal(problem: Problem, kind: str, mc_samples: int = 1, seed: int = 0, backend: str = "auto",
                 memory_budget: int | None = None) -> Tensor:
    """The undamped diagonal of ``kind`` ∈ {diag_ggn, diag_fisher_mc, empirical_fisher_diag} as a flat tensor
    (for reductions over data shards, where a single shard's diagonal may have zeros).

    ``backend``: ``backpack`` (BackPACK's extensions), ``torch`` (exact per-sample VJPs with ``torch.func``,
    :func:`curvdist.geometry.blocks.diagonal.diagonal_sums`, any differentiable model; sampled labels are those of
    the ``fisher_mc`` operator with the same seed) or ``auto`` (BackPACK where it applies; for ``diag_fisher_mc``
    always the own kernels, whose labels are keyed by the global sample index — the same on any split of the data —
    where BackPACK draws from the global RNG per pass). ``memory_budget``: bytes of one vectorized chunk of the own
    kernels' per-sample products (default 2 GiB)."""
    if kind not in _OWN_KIND:
        raise MetricError(f"unknown diagonal metric {kind!r}")
    check_mc_samples(mc_samples)
    if kind == "diag_fisher_mc" and backend == "auto":
        backend = "torch"
    make, savefield, second_order = _extension(kind, mc_samples)
    if resolve_backend(problem, backend, make, second_order) == "torch":
        from ..blocks.diagonal import diagonal_sums

        try:
            return diagonal_sums(problem, _OWN_KIND[kind], mc_samples, seed, memory_budget) * problem.scale
        except NotImplementedError as e:
            raise MetricError(f"the {problem.loss.name} loss cannot give exact output-space factors ({e}); use "
                              f"diag_fisher_mc, or give the loss an output_hessian_sqrt") from e
    if kind == "diag_fisher_mc":
        with seeded(seed, problem.device):
            return _diagonal_values(problem, make, savefield, kind, second_order)
    return _diagonal_values(problem, make, savefield, kind, second_order)


def _diagonal(problem: Problem, kind: str, damping: float, mc_samples: int = 1, seed: int = 0,
              backend: str = "auto", damping_diagonal: Tensor | None = None,
              memory_budget: int | None = None) -> DiagonalMetric:
    diag = raw_diagonal(problem, kind, mc_samples, seed, backend, memory_budget)
    return DiagonalMetric(diag, damping=damping, kind=kind,
                          names=entry_names(problem, diag, damping, damping_diagonal),
                          damping_diagonal=damping_diagonal)


def entry_names(problem: Problem, diag: Tensor, damping: float,
                damping_diagonal: Tensor | None = None) -> list[str] | None:
    """The parameter name of every flat entry, for DiagonalMetric's error message; built only when an entry of
    diag + damping (· damping_diagonal) is ≤ 0 (a name per entry costs a pointer per parameter)."""
    damped = diag + damping if damping_diagonal is None else diag + damping * damping_diagonal.reshape(-1).to(diag)
    if bool((damped > 0).all()):
        return None
    return [n for n, s in zip(problem.param_names, problem.shapes) for _ in range(s.numel())]


# ====================================================================== public
def diag_ggn(problem: Problem, damping: float = 0.0, backend: str = "auto",
             damping_diagonal: Tensor | None = None, memory_budget: int | None = None) -> DiagonalMetric:
    """The exact diagonal of the generalized Gauss-Newton matrix, M_δ = diag(G) + δI (δ·diag(r) with
    ``damping_diagonal`` r, e.g. the pulled-back θ-identity diag(JᵀJ), see :mod:`curvdist.geometry.damping`).

    G = s · Σ_n J_nᵀ Λ_n J_n with J_n = ∂f(x_n; θ)/∂θ and Λ_n = ∂²ℓ_n/∂f_n² (for cross-entropy and MSE this is
    also the exact type-2 Fisher). Computed with BackPACK's ``DiagGGNExact`` (Dangel, Kunstner & Hennig 2020),
    which backpropagates the symmetric factorization Λ_n = S_n S_nᵀ, in one backward pass per batch, or, for
    models and losses BackPACK cannot handle (``backend="auto"``/``"torch"``: any curvdist loss, including the
    language-model losses and user losses with an ``output_hessian_sqrt``), from per-sample VJPs J_nᵀ S_n e_k.

    The own kernels vectorize the per-sample products in chunks whose results fit in ``memory_budget`` bytes
    (default 2 GiB); running out of memory is a MetricError naming that option.

    A diagonal metric is a tensor only under reparametrizations with a diagonal Jacobian.

    Raises:
        MetricError: with ``backend="backpack"``, a selected parameter's layer (or a layer on the way to the
            output) is not supported by BackPACK or the loss is not curvdist's cross-entropy/MSE; with the own
            kernels, the loss has no ``output_hessian_sqrt``.
        SingularMetricError: an entry of diag(G) + δ is 0 (e.g. a weight fed by an input that is always 0);
            add damping.
    """
    return _diagonal(problem, "diag_ggn", damping, backend=backend, damping_diagonal=damping_diagonal,
                     memory_budget=memory_budget)


def diag_fisher_mc(problem: Problem, damping: float = 0.0, mc_samples: int = 1, seed: int = 0,
                   backend: str = "auto", damping_diagonal: Tensor | None = None,
                   memory_budget: int | None = None) -> DiagonalMetric:
    """A Monte-Carlo estimate of the diagonal of the Fisher (= GGN for cross-entropy and MSE), M_δ = diag(G̃) + δI
    (δ·diag(r) with ``damping_diagonal`` r, as in :func:`diag_ggn`).

    G̃ = s · Σ_n (1/S) Σ_{k=1..S} J_nᵀ g̃_nk g̃_nkᵀ J_n with g̃_nk = ∇_f ℓ(f_n, ỹ_nk) for labels ỹ_nk drawn from the
    model's predictive distribution p(y | f_n) (categorical for cross-entropy, N(f_n, ½I) for MSE), S = mc_samples.
    E[G̃] = diag(G). Computed with BackPACK's ``DiagGGNMC`` (Dangel, Kunstner & Hennig 2020). The draws come from
    torch's global generator seeded with ``seed`` inside ``torch.random.fork_rng``: the result is reproducible for
    a seed and the caller's random state is left as it was. With the ``torch`` backend (automatic where BackPACK
    does not apply) the labels are those of the ``fisher_mc`` operator with the same seed, so the result is exactly
    the diagonal of that operator.

    A diagonal metric is a tensor only under reparametrizations with a diagonal Jacobian.
    """
    return _diagonal(problem, "diag_fisher_mc", damping, mc_samples, seed, backend, damping_diagonal, memory_budget)


def empirical_fisher_diag(problem: Problem, damping: float = 0.0, backend: str = "auto",
                          damping_diagonal: Tensor | None = None, memory_budget: int | None = None
                          ) -> DiagonalMetric:
    """The diagonal of the empirical Fisher, M_δ = diag(s · Σ_n g_n ∘ g_n) + δI with g_n = ∇_θ ℓ(f(x_n; θ), y_n)
    (δ·diag(r) with ``damping_diagonal`` r, as in :func:`diag_ggn`).

    Computed with BackPACK's first-order ``SumGradSquared`` (Dangel, Kunstner & Hennig 2020) from per-sample
    gradients of the layers it supports (Linear, convolutions, BatchNorm in eval mode, Embedding, RNN/LSTM), or
    from per-sample gradients with ``torch.func`` for any other parameter (``backend="auto"``/``"torch"``).

    A diagonal metric is a tensor only under reparametrizations with a diagonal Jacobian.
    """
    return _diagonal(problem, "empirical_fisher_diag", damping, backend=backend, damping_diagonal=damping_diagonal,
                     memory_budget=memory_budget)
