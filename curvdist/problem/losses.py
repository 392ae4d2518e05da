"""Losses with their output-space curvature.

A loss here is a per-sample function ℓ(f, y) of the network output f. For the generalized Gauss-Newton and the
Fisher each loss provides the product with its output-space Hessian Λ = ∂²ℓ/∂f², and a sampler of targets from the
predictive distribution whose negative log-likelihood ℓ is (for Monte-Carlo Fisher products).

Both built-in losses are negative log-likelihoods of exponential families in their natural parameter f, so the
exact (type-2) Fisher equals the GGN: E_{y~p(·|f)}[∇ℓ ∇ℓᵀ] = Λ.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..catalogue import LossKind, parse
from ..errors import DataError, UnknownNameError
from .sampling import SampleKeys, categorical, gaussian


def require_tensor(output: object, loss: str) -> None:
    """Refuse a model's raw return value (a Hugging Face ``ModelOutput``, a dict, a tuple) reaching a loss."""
    if not isinstance(output, Tensor):
        hint = " (pass its .logits)" if hasattr(output, "logits") else ""
        raise DataError(f"the {loss} loss got a {type(output).__name__}{hint}, not the output tensor; curvdist.Problem "
                        f"reads the logits from ModelOutputs, dicts and tuples itself")


class Loss(ABC):
    """A per-sample loss ℓ(f, y) with its output Hessian Λ and predictive sampler.

    A sample's loss may be a sum of independent *events* (the tokens of a sequence for the language-model losses):
    ``event_ndim`` leading output axes index them (1: one event per sample, the batch axis; 2: (batch, position)),
    and Λ_n is block-diagonal over the events of sample n. :meth:`count` gives the number of loss terms a batch
    contributes to the mean (samples, or non-ignored tokens).
    """

    name: str
    event_ndim: int = 1

    def count(self, target: Tensor) -> int:
        """The number of terms of the mean that a batch with labels ``target`` contributes: its samples."""
        return int(target.shape[0])

    @abstractmethod
    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """ℓ(f_n, y_n) for every sample n, shape (B,)."""

    @abstractmethod
    def output_hessian_apply(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        """Λ_n v_n for every sample n, where Λ_n = ∂²ℓ(f_n, y_n)/∂f_n²; v has the shape of output."""

    @abstractmethod
    def sample_targets(self, output: Tensor, generator: torch.Generator, samples: int,
                       target: Tensor | None = None) -> Tensor:
        """Draw `samples` targets per sample from p(y | f), shape (samples, *target_shape); ``target`` (the
        observed labels) tells losses with ignored positions where not to draw."""

    def draw_targets(self, output: Tensor, keys: SampleKeys, samples: int, target: Tensor | None = None) -> Tensor:
        """:meth:`sample_targets` with the draws keyed by (seed, global sample index, position, draw)
        (:mod:`curvdist.operators.sampling`), so that a sample's labels do not depend on how the data are split.
        The built-in losses implement it; for another loss this default draws with ``keys.generator()`` (seeded by
        the seed and the batch's first sample), whose labels do depend on the batching."""
        return self.sample_targets(output, keys.generator(), samples, target)

    def output_hessian_sqrt(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """Columns of a symmetric factor of every *event's* Λ, shape (K, *output.shape): Λ_e = Σ_k U[k, e] U[k, e]ᵀ
        (the output-side factor of exact GGN blocks, as in KFLR); for ``event_ndim == 1`` an event is a sample."""
        raise NotImplementedError(f"{type(self).__name__} defines no factorization of its output Hessian")

    @abstractmethod
    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise DataError when output and target do not fit this loss."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def softmax_hessian_factor(logits: Tensor) -> Tensor:
    """U (C, B, C), U[c, n] = √p_c (e_c − p), p = softmax(logits_n): Σ_c U[c, n] U[c, n]ᵀ = diag(p) − ppᵀ, the
    cross-entropy's output Hessian (differentiable in the logits unless they are detached)."""
    p = torch.softmax(logits, dim=-1)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))


class CrossEntropy(Loss):
    """ℓ(f, y) = −log softmax(f)_y for logits f ∈ ℝ^C and a class index y.

    Output Hessian Λ = diag(p) − p pᵀ with p = softmax(f); predictive distribution Categorical(p).
    """

    name = "cross_entropy"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        require_tensor(output, self.name)
        return torch.nn.functional.cross_entropy(output, target, reduction="none")

    def output_hessian_apply(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(output, dim=-1)
        return p * v - p * (p * v).sum(dim=-1, keepdim=True)

    def output_hessian_sqrt(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """U[c, n] = √p_c (e_c − p) for c = 1..C: Σ_c U[c] U[c]ᵀ = diag(p) − p pᵀ since Σ_c p_c = 1."""
        return softmax_hessian_factor(output.detach())

    def sample_targets(self, output: Tensor, generator: torch.Generator, samples: int,
                       target: Tensor | None = None) -> Tensor:
        p = torch.softmax(output.detach(), dim=-1).to(device=generator.device, dtype=torch.float64)
        draws = torch.multinomial(p, samples, replacement=True, generator=generator)  # (B, S)
        return draws.T.contiguous().to(output.device)

    def draw_targets(self, output: Tensor, keys: SampleKeys, samples: int, target: Tensor | None = None) -> Tensor:
        """Class labels (S, B) by inverting the CDF of p(· | f_n) at the uniform keyed by (seed, n, draw)."""
        p = torch.softmax(output.detach(), dim=-1)
        return categorical(p, keys.uniform(samples, p.shape[0]).to(p.device))

    def check(self, output: Tensor, target: Tensor) -> None:
        require_tensor(output, self.name)
        if output.ndim != 2:
            raise DataError(
                f"cross_entropy expects model outputs of shape (batch, classes), got {tuple(output.shape)}"
            )
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise DataError(f"cross_entropy expects integer class targets, got dtype {target.dtype}")
        if target.shape != output.shape[:1]:
            raise DataError(
                f"cross_entropy expects targets of shape {(output.shape[0],)}, got {tuple(target.shape)}"
            )
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= output.shape[1]):
            raise DataError(
                f"cross_entropy targets must lie in [0, {output.shape[1] - 1}], "
                f"got range [{int(target.min())}, {int(target.max())}]"
            )


class MeanSquaredError(Loss):
    """ℓ(f, y) = ‖f − y‖² summed over the output dimensions of one sample.

    Output Hessian Λ = 2I. It is the negative log-likelihood (up to a constant) of y ~ N(f, ½I), which is the
    predictive distribution sampled for Monte-Carlo Fisher products.
    """

    name = "mse"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        require_tensor(output, self.name)
        return (output - target).pow(2).flatten(1).sum(dim=1)

    def output_hessian_apply(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        return 2.0 * v

    def output_hessian_sqrt(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """U[k, n] = √2 e_k (the output flattened per sample): Σ_k U[k] U[k]ᵀ = 2I."""
        flat = output.detach().flatten(1)
        eye = math.sqrt(2.0) * torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        return eye.unsqueeze(1).expand(-1, flat.shape[0], -1).reshape(flat.shape[1], *output.shape)

    def sample_targets(self, output: Tensor, generator: torch.Generator, samples: int,
                       target: Tensor | None = None) -> Tensor:
        noise = torch.randn(
            (samples, *output.shape), generator=generator, device=generator.device, dtype=torch.float64
        )
        return output.detach().unsqueeze(0) + math.sqrt(0.5) * noise.to(device=output.device, dtype=output.dtype)

    def draw_targets(self, output: Tensor, keys: SampleKeys, samples: int, target: Tensor | None = None) -> Tensor:
        """y ~ N(f_n, ½I) (the predictive distribution of ℓ = ‖f − y‖²), the noise keyed by (seed, n, entry, draw)."""
        noise = gaussian(keys, samples, tuple(output.shape))
        return output.detach().unsqueeze(0) + math.sqrt(0.5) * noise.to(device=output.device, dtype=output.dtype)

    def check(self, output: Tensor, target: Tensor) -> None:
        require_tensor(output, self.name)
        if target.shape != output.shape:
            raise DataError(
                f"mse expects targets of the output's shape {tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if not target.is_floating_point():
            raise DataError(f"mse expects floating-point targets, got dtype {target.dtype}")


def _losses() -> dict[str, type[Loss]]:
    from .token_losses import CausalLM, TokenCrossEntropy

    return {LossKind.CROSS_ENTROPY.value: CrossEntropy, LossKind.MSE.value: MeanSquaredError,
            LossKind.CAUSAL_LM.value: CausalLM, LossKind.TOKEN_CROSS_ENTROPY.value: TokenCrossEntropy}


ALIASES = {"crossentropy": LossKind.CROSS_ENTROPY.value, "ce": LossKind.CROSS_ENTROPY.value}


def make_loss(loss: str | Loss) -> Loss:
    """Resolve a loss name (``cross_entropy``, ``mse``, ``causal_lm``, ``token_cross_entropy``) or pass a :class:`Loss` through."""
    if isinstance(loss, Loss):
        return loss
    name = ALIASES.get(loss.lower(), loss.lower()) if isinstance(loss, str) else loss
    try:
        return _losses()[parse(LossKind, name, "loss").value]()
    except UnknownNameError as e:
        raise UnknownNameError(f"{e} (or pass a curvdist Loss)") from None
