"""A small zoo of models and data made from code, for configs, tests and benchmarks."""

from .data import digits, regression
from .language import hf_causal_lm, hf_sequence_classifier, markov_corpus
from .models import GainRegressor, TransformerBlockClassifier, cnn, gain_regressor, mlp, transformer
from .resnet import ResNet, calibrate_batchnorm, resnet18

__all__ = ["GainRegressor", "ResNet", "TransformerBlockClassifier", "calibrate_batchnorm", "cnn", "digits",
           "gain_regressor", "hf_causal_lm", "hf_sequence_classifier", "markov_corpus", "mlp", "regression",
           "resnet18", "transformer"]
