"""Reparametrizations ψ ↦ θ = φ(ψ) and the reparametrized problem.

Kinds (lowercase constructors): :func:`scale`, :func:`exp`, :func:`softplus`, :func:`ntk`, :func:`weight_norm`,
:func:`linear`, :func:`compose`; :func:`make_reparam` builds any of them from plain data. :func:`reparametrize`
turns a problem in θ into the same problem in ψ, evaluated by autodiff through φ.
"""

from __future__ import annotations

from .base import Params, Reparametrization
from .compose import Compose, compose
from .elementwise import Elementwise, Exp, Scale, Softplus, exp, scale, softplus
from .factory import KINDS, make_reparam
from .linear import Linear, linear, random_well_conditioned
from .ntk import NTK, ntk
from .reparametrize import ReparametrizedModel, psi_key, reparametrize
from .weight_norm import WeightNorm, weight_norm

__all__ = [
    "KINDS", "NTK", "Compose", "Elementwise", "Exp", "Linear", "Params", "Reparametrization", "ReparametrizedModel",
    "Scale", "Softplus", "WeightNorm", "compose", "exp", "linear", "make_reparam", "ntk", "psi_key",
    "random_well_conditioned", "reparametrize", "scale", "softplus", "weight_norm",
]
