"""Token-level cross-entropy losses of language models, with exact output-space curvature.

For logits f ∈ ℝ^{B×T×V} and labels y ∈ ℤ^{B×T} (``-100`` = ignored, the Hugging Face convention) a sample's
loss is a sum over its non-ignored tokens,

    ℓ_n = Σ_{t ∈ valid(n)} −log softmax(f_{n,t})_{y_{n,t'}},

with t' = t + 1 for :class:`CausalLM` (the logits at position t predict the next token) and t' = t for
:class:`TokenCrossEntropy` (masked LM, token classification). With ``reduction="mean"`` the problem divides by
the number of non-ignored tokens of the whole data set (:meth:`count`). Every token is an *event*
(``event_ndim = 2``): its output Hessian is Λ_{n,t} = diag(p) − ppᵀ with p = softmax(f_{n,t}), applied as
p⊙u − p(pᵀu) in O(V) per token (nothing V×V is formed), and zero at positions without a valid label. The
type-2 Fisher of these categorical likelihoods equals Λ; ``fisher_mc`` draws one token per valid position from
Categorical(p_{n,t}); the empirical Fisher uses the observed token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .sampling import SampleKeys, categorical
from ..resources import check_allocation
from .losses import Loss, require_tensor

IGNORE_INDEX = -100
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class TokenCrossEntropy(Loss):
    """ℓ_n = Σ_t −log softmax(f_{n,t})_{y_{n,t}} over the positions with y_{n,t} ≠ −100 (no shift)."""

    name = "token_cross_entropy"
    event_ndim = 2
    shift = 0

    # ---------------------------------------------------------------- alignment of logits and labels
    def aligned_labels(self, target: Tensor) -> Tensor:
        """The label each logit position is scored against, shape (B, T); −100 where there is none."""
        if not self.shift:
            return target
        pad = torch.full_like(target[:, :1], IGNORE_INDEX)
        return torch.cat([target[:, 1:], pad], dim=1)

    def valid(self, target: Tensor) -> Tensor:
        """(B, T) boolean mask of the logit positions that enter the loss."""
        return self.aligned_labels(target) != IGNORE_INDEX

    def count(self, target: Tensor) -> int:
        """The number of non-ignored tokens of the batch (what ``reduction="mean"`` divides by, summed)."""
        return int(self.valid(target).sum())

    # ---------------------------------------------------------------- loss and curvature
    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        require_tensor(output, self.name)
        labels = self.aligned_labels(target)
        B, T, V = output.shape
        tok = F.cross_entropy(output.reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE_INDEX,
                              reduction="none")
        return tok.view(B, T).sum(dim=1)

    def output_hessian_apply(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(output, dim=-1)
        mask = self.valid(target).unsqueeze(-1).to(p.dtype)
        return mask * (p * v - p * (p * v).sum(dim=-1, keepdim=True))

    def output_hessian_sqrt(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """U[c, n, t] = √p_c (e_c − p) at every valid position (zero elsewhere), shape (V, B, T, V): per token
        Σ_c U U ᵀ = diag(p) − ppᵀ. (The columns of a whole sequence's factor are these, one position at a time:
        :func:`curvdist.operators.output_space.per_sample_factors`.)"""
        if target is None:
            raise DataError(f"{self.name} needs the labels to know which positions are ignored")
        V = output.shape[-1]
        check_allocation(V * output.numel() * output.element_size(),
                         f"the exact output-Hessian factor of {output.shape[0]}×{output.shape[1]} tokens over a "
                         f"{V}-token vocabulary (V columns of (B, T, V): KFLR)",
                         "use the sampled 'kfac' metric (one row per token), or fewer tokens per batch")
        p = torch.softmax(output.detach(), dim=-1)  # (B, T, V)
        eye = torch.eye(V, dtype=p.dtype, device=p.device).view(V, 1, 1, V)
        U = p.movedim(-1, 0).sqrt().unsqueeze(-1) * (eye - p.unsqueeze(0))
        return U * self.valid(target).unsqueeze(-1).to(p.dtype)

    def sample_targets(self, output: Tensor, generator: torch.Generator, samples: int,
                       target: Tensor | None = None) -> Tensor:
        """Labels shaped like ``target`` (S, B, T): a token from Categorical(p_{n,t}) at every valid logit
        position (written where the loss reads the label: one position later for the causal shift), −100
        elsewhere."""
        if target is None:
            raise DataError(f"{self.name} needs the labels to know which positions to sample")
        B, T, V = output.shape
        p = torch.softmax(output.detach(), dim=-1).to(device=generator.device, dtype=torch.float64)
        draws = torch.multinomial(p.reshape(B * T, V), samples, replacement=True, generator=generator)
        return self._placed(draws.T.reshape(samples, B, T).to(output.device), target)

    def draw_targets(self, output: Tensor, keys: SampleKeys, samples: int, target: Tensor | None = None) -> Tensor:
        """As :meth:`sample_targets`, the token at logit position t of sample n drawn from the uniform keyed by
        (seed, n, t, draw): the same labels however the data are split."""
        if target is None:
            raise DataError(f"{self.name} needs the labels to know which positions to sample")
        B, T, _ = output.shape
        p = torch.softmax(output.detach(), dim=-1)
        draws = categorical(p, keys.uniform(samples, B, T).to(p.device))
        return self._placed(draws, target)

    def _placed(self, draws: Tensor, target: Tensor) -> Tensor:
        """Draws (S, B, T) at the logit positions → labels: −100 where no label is kept, shifted for causal LMs."""
        sampled = torch.where(self.valid(target).unsqueeze(0), draws, torch.full_like(draws, IGNORE_INDEX))
        if not self.shift:
            return sampled
        return torch.cat([torch.full_like(sampled[..., :1], IGNORE_INDEX), sampled[..., :-1]], dim=-1)

    def check(self, output: Tensor, target: Tensor) -> None:
        require_tensor(output, self.name)
        if output.ndim != 3:
            raise DataError(f"{self.name} expects logits of shape (batch, positions, vocabulary), got "
                            f"{tuple(output.shape)}")
        if target.dtype not in INTEGER_DTYPES:
            raise DataError(f"{self.name} expects integer token labels, got dtype {target.dtype}")
        if tuple(target.shape) != tuple(output.shape[:2]):
            raise DataError(f"{self.name}: labels of shape {tuple(target.shape)} do not match the logits' (batch, "
                            f"positions) = {tuple(output.shape[:2])}; labels must have the shape of input_ids")
        V = output.shape[-1]
        kept = target[target != IGNORE_INDEX]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= V):
            raise DataError(f"{self.name} labels must lie in [0, {V - 1}] (the vocabulary) or be {IGNORE_INDEX} "
                            f"(ignored), got range [{int(kept.min())}, {int(kept.max())}]")


class CausalLM(TokenCrossEntropy):
    """ℓ_n = Σ_t −log softmax(f_{n,t})_{y_{n,t+1}}: the logits at position t predict the label at t + 1 (the
    labels are the inputs themselves, unshifted, as Hugging Face causal LMs take them); −100 labels and the last
    position are ignored."""

    name = "causal_lm"
    shift = 1
