"""Problem: model + loss + data + parameter selection, with its samples here or split over shards."""

from .base import BaseProblem, StagedProblem
from .losses import CrossEntropy, Loss, MeanSquaredError, make_loss
from .problem import Problem
from .reducers import InProcessReducer, ProcessGroupReducer, Shard, ShardReducer
from .sharded import ShardedProblem
from .spec import ProblemSpec

__all__ = ["BaseProblem", "CrossEntropy", "InProcessReducer", "Loss", "MeanSquaredError", "Problem",
           "ProblemSpec", "ProcessGroupReducer", "Shard", "ShardReducer", "ShardedProblem", "StagedProblem",
           "make_loss"]
