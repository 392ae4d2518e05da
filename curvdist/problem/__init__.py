"""Problem: model + loss + data + parameter selection."""

from .losses import CrossEntropy, Loss, MeanSquaredError, make_loss
from .problem import Problem

__all__ = ["CrossEntropy", "Loss", "MeanSquaredError", "Problem", "make_loss"]
