"""A small zoo of models and data made from code, for configs, tests and benchmarks."""

from .data import digits, regression
from .models import GainRegressor, TransformerBlockClassifier, cnn, gain_regressor, mlp, transformer

__all__ = ["GainRegressor", "TransformerBlockClassifier", "cnn", "digits", "gain_regressor", "mlp", "regression",
           "transformer"]
