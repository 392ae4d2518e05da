"""Integrations of curvdist with training frameworks. Each lives in its own subpackage and imports its framework
lazily, so ``import curvdist`` never needs them:

* :mod:`curvdist.integrations.deepspeed`: a curvature monitor for ``DeepSpeedEngine`` runs and a Riemannian
  preconditioner usable as DeepSpeed's client optimizer (``pip install 'curvdist[deepspeed]'``).
"""
