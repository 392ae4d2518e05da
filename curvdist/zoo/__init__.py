"""A small zoo of models and data made from code, for configs, tests and benchmarks."""

from .data import digits, regression
from .models import TransformerBlockClassifier, cnn, mlp, transformer

__all__ = ["TransformerBlockClassifier", "cnn", "digits", "mlp", "regression", "transformer"]
