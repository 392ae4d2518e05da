"""Data sets made from code: scikit-learn's bundled digits (no download) and synthetic regression data."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

SHAPES = ("flat", "image", "sequence", "tokens")


def digits(split: str = "train", test_fraction: float = 0.2, shape: str = "flat", n: int | None = None,
           seed: int = 0, dtype: str | torch.dtype = "float32") -> tuple[Tensor, Tensor]:
    """The 8×8 handwritten digits of scikit-learn (1,797 images, 10 classes), standardized per pixel with the
    training split's mean and standard deviation.

    ``split``: train | test | all; the split is stratified and fixed by ``seed``. ``shape``: flat (N, 64),
    image (N, 1, 8, 8), sequence (N, 8, 8) — 8 tokens of 8 features — or tokens (N, 64): the raw pixel
    intensities 0…16 as integer tokens (vocabulary 17, not standardized). ``n`` keeps the first n samples.
    Returns (X, y) with integer labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise DataError(f"split must be train, test or all, got {split!r}")
    if shape not in SHAPES:
        raise DataError(f"shape must be one of {SHAPES}, got {shape!r}")
    X, y = load_digits(return_X_y=True)
    raw = X.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=y)
    mean = X[idx_train].mean(0)
    std = X[idx_train].std(0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    idx = {"train": idx_train, "test": idx_test, "all": np.arange(len(y))}[split]
    X, y, raw = X[idx], y[idx], raw[idx]
    if n is not None:
        if n < 1:
            raise DataError(f"n must be positive, got {n}")
        X, y, raw = X[:n], y[:n], raw[:n]
    if shape == "tokens":
        return torch.as_tensor(raw), torch.as_tensor(y, dtype=torch.long)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    Xt = torch.as_tensor(X, dtype=dt)
    if shape == "image":
        Xt = Xt.view(-1, 1, 8, 8)
    elif shape == "sequence":
        Xt = Xt.view(-1, 8, 8)
    return Xt, torch.as_tensor(y, dtype=torch.long)


def regression(n: int = 64, in_features: int = 3, out_features: int = 2, noise: float = 0.1, seed: int = 0,
               dtype: str | torch.dtype = "float32") -> tuple[Tensor, Tensor]:
    """Synthetic regression: y = sin(X A) + noise·ε with fixed random A, X ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    X = torch.randn(n, in_features, generator=g, dtype=torch.float64)
    A = torch.randn(in_features, out_features, generator=g, dtype=torch.float64)
    y = torch.sin(X @ A) + noise * torch.randn(n, out_features, generator=g, dtype=torch.float64)
    return X.to(dt), y.to(dt)
