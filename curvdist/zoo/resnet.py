"""ResNet-18 (He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition") in plain torch.

Written here so that benchmarks and tests can use the standard ImageNet architecture without torchvision (which
curvdist never imports). The layout is the paper's 18-layer network:

    conv 7×7/2 (64) → BatchNorm → ReLU → max-pool 3×3/2
    → 4 stages of 2 BasicBlocks with 64, 128, 256, 512 channels (stages 2–4 start with stride 2)
    → global average pool → Linear(512, num_classes)

A BasicBlock is x ↦ ReLU(BN(conv3×3(ReLU(BN(conv3×3(x))))) + shortcut(x)), the shortcut a 1×1 strided conv +
BatchNorm where the shape changes (option B of the paper), else the identity. Convolutions have no bias (the
BatchNorm that follows has one). With ``width=64`` and 1000 classes the network has 11,689,512 parameters; with 10
classes 11,181,642 (the "11.2M" configuration). ``width`` scales every channel count (width w gives w, 2w, 4w, 8w),
so ``width=4`` is a tiny network for tests.

curvdist refuses BatchNorm in train mode (the loss would couple the samples of a batch and every pass would update
the running statistics): use the model in ``eval()`` mode, where BatchNorm is a fixed per-channel affine map; the
factory returns it in eval mode. :func:`calibrate_batchnorm` sets the running statistics from data first, so that
the eval-mode network sees normalized activations as a trained one would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import ProblemError


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a residual connection (a projection where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: stem, ``len(blocks)`` stages (channel counts width·2^i), average pool, linear head.

    Input (B, in_channels, H, W) with H, W ≥ 1 (the pooling is adaptive; the ImageNet size is 224×224).
    """

    def __init__(self, blocks: Iterable[int] = (2, 2, 2, 2), num_classes: int = 1000, width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if width < 1 or num_classes < 1 or in_channels < 1 or not blocks or min(blocks) < 1:
            raise ProblemError(f"ResNet needs positive width, num_classes, in_channels and block counts; got "
                               f"width={width}, num_classes={num_classes}, in_channels={in_channels}, "
                               f"blocks={blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        c = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c, c_out, stride)] + [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(h), 1))


def resnet18(num_classes: int = 1000, width: int = 64, in_channels: int = 3, seed: int = 0,
             dtype: str | torch.dtype = "float32") -> ResNet:
    """ResNet-18 (2 BasicBlocks per stage) in eval mode: 11,689,512 parameters for 1000 classes, 11,181,642 for
    10 classes at ``width=64``; ``width`` scales all channel counts."""
    torch.manual_seed(seed)
    model = ResNet((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return model.to(dt).eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Set every BatchNorm's running mean and variance to the averages over ``batches`` (input tensors), then put
    the model in eval mode. The model's parameters are not changed."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    try:
        for X in batches:
            model(X)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return model


__all__ = ["BasicBlock", "ResNet", "calibrate_batchnorm", "resnet18"]
