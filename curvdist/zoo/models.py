"""Small models for configs, tests and benchmarks. All are deterministic (no dropout) and built from a seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ProblemError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "elu": nn.ELU,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ProblemError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def mlp(in_features: int = 64, hidden: Sequence[int] = (16,), out_features: int = 10, activation: str = "tanh",
        seed: int = 0, dtype: str | torch.dtype = "float32") -> nn.Sequential:
    """Fully connected network in → hidden… → out with ``activation`` between layers (an ``nn.Sequential``)."""
    torch.manual_seed(seed)
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers).to(_dtype(dtype))


def cnn(channels: Sequence[int] = (4, 8), image_size: int = 8, in_channels: int = 1, out_features: int = 10,
        activation: str = "tanh", seed: int = 0, dtype: str | torch.dtype = "float32") -> nn.Sequential:
    """Conv(3×3, padding 1) + activation blocks, a 2×2 max-pool after the first, then flatten and a linear head.
    Input (B, in_channels, image_size, image_size)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c, c_out, 3, padding=1), _activation(activation)]
        if i == 0:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c = c_out
    layers += [nn.Flatten(), nn.Linear(c * size * size, out_features)]
    return nn.Sequential(*layers).to(_dtype(dtype))


class TransformerBlockClassifier(nn.Module):
    """A pre-LayerNorm transformer block over a sequence of tokens, mean-pooled into a linear classifier.

    x (B, T, F) → Linear(F, d) + learned positions → x + MHA(LN(x)) → x + MLP(LN(x)) → mean over T → Linear(d, C).
    The attention is ``nn.MultiheadAttention`` (fused q/k/v projection), the MLP uses GELU; no dropout.
    With ``vocab`` the input is integer tokens (B, T) embedded by ``nn.Embedding(vocab, d)`` instead of features
    (B, T, F) mapped by a Linear; ``positions="embedding"`` holds the learned positions in an ``nn.Embedding``
    (looked up for 0..T−1) instead of a bare parameter.
    """

    def __init__(self, tokens: int = 8, features: int = 8, d_model: int = 16, heads: int = 2, mlp_ratio: int = 2,
                 out_features: int = 10, vocab: int | None = None, positions: str = "parameter") -> None:
        super().__init__()
        if positions not in ("parameter", "embedding"):
            raise ProblemError(f"positions must be 'parameter' or 'embedding', got {positions!r}")
        self.embed: nn.Module = nn.Linear(features, d_model) if vocab is None else nn.Embedding(vocab, d_model)
        if positions == "parameter":
            self.pos: nn.Parameter | nn.Embedding = nn.Parameter(0.02 * torch.randn(tokens, d_model))
        else:
            self.pos = nn.Embedding(tokens, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if isinstance(self.pos, nn.Embedding):  # one lookup per sample, so every sample's positions are its own
            h = h + self.pos(torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1))
        else:  # a parameter (functional_call passes it as a plain tensor)
            h = h + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(dim=1))


def transformer(tokens: int = 8, features: int = 8, d_model: int = 16, heads: int = 2, mlp_ratio: int = 2,
                out_features: int = 10, seed: int = 0, dtype: str | torch.dtype = "float32",
                vocab: int | None = None, positions: str = "parameter") -> TransformerBlockClassifier:
    """A tiny transformer-block classifier (see :class:`TransformerBlockClassifier`); digits as 8 rows of 8."""
    torch.manual_seed(seed)
    return TransformerBlockClassifier(tokens, features, d_model, heads, mlp_ratio, out_features, vocab,
                                      positions).to(_dtype(dtype))


class GainRegressor(nn.Module):
    """f(x) = gain ⊙ tanh(W x + b) + c with a positive per-output ``gain`` (a scale parameter, the natural target of
    an ``exp``/``softplus`` reparametrization)."""

    def __init__(self, in_features: int = 3, out_features: int = 2, gain: float = 1.0) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)
        self.gain = nn.Parameter(torch.full((out_features,), float(gain)))
        self.offset = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * torch.tanh(self.lin(x)) + self.offset


def gain_regressor(in_features: int = 3, out_features: int = 2, gain: float = 1.0, seed: int = 0,
                   dtype: str | torch.dtype = "float32") -> GainRegressor:
    """A small regression model with a positive gain parameter (see :class:`GainRegressor`)."""
    torch.manual_seed(seed)
    return GainRegressor(in_features, out_features, gain).to(_dtype(dtype))
