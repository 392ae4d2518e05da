"""What the DeepSpeed scenarios and tests/integrations/deepspeed/test_deepspeed.py share: the model, the batches and the monitor's
queries (no DeepSpeed import here, so the test module collects without DeepSpeed)."""

from __future__ import annotations

import torch

from curvdist import zoo

MODEL = {"in_features": 64, "hidden": (8,), "out_features": 10, "seed": 0}
GLOBAL_BATCH = 16
HELD = 40
#: the KL clip of the momentum runs of the preconditioner (binding at the first steps)
MOMENTUM_KL_CLIP = 0.05
#: the moving-average decay of the preconditioner's statistics from the training step
STEP_DECAY = 0.8
MONITOR = {
    "every": 2,
    "seed": 0,
    "zero3": "gather",  # every query and metric: on ZeRO-3 the monitor gathers a replica
    "queries": [
        {"kind": "eigs", "name": "eigs", "k": 2, "curvature": "hessian"},
        {"kind": "flatness", "name": "flatness", "curvature": "ggn",
         "metric": {"kind": "fisher", "damping": 0.01}, "matvecs": 12, "probes": 3, "steps": 12},
        {"kind": "trace", "name": "trace_diag", "curvature": "ggn", "method": "hutchpp", "matvecs": 12,
         "metric": {"kind": "diag_ggn", "damping": 0.001}},
        {"kind": "eigs", "name": "eigs_fisher", "k": 1, "curvature": "hessian",
         "metric": {"kind": "fisher", "damping": 0.01}},
        {"kind": "eigs", "name": "eigs_kflr", "k": 1, "curvature": "ggn", "metric": {"kind": "kflr", "damping": 0.001}},
        {"kind": "grad_norm", "name": "grad_norm", "metric": {"kind": "fisher", "damping": 0.01}},
    ],
}


def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The training samples; global batch s is rows [16·s, 16·(s+1)) modulo 128."""
    return zoo.digits(split="train", n=GLOBAL_BATCH * 8)


def held() -> tuple[torch.Tensor, torch.Tensor]:
    """The monitor's held batch."""
    return zoo.digits(split="test", n=HELD)


TRANSFORMER = {"seed": 0}
TRANSFORMER_MONITOR = {
    "every": 2,
    "seed": 0,
    "zero3": "gather",
    "dtype": "float64",
    "queries": [
        {"kind": "eigs", "name": "eigs", "k": 2, "curvature": "hessian"},
        {"kind": "eigs", "name": "eigs_fisher", "k": 1, "curvature": "hessian",
         "metric": {"kind": "fisher", "damping": 0.01}},
        {"kind": "trace", "name": "trace_diag", "curvature": "ggn", "method": "hutchpp", "matvecs": 10,
         "metric": {"kind": "diag_ggn", "damping": 0.01}},
        {"kind": "grad_norm", "name": "grad_norm_ef", "metric": {"kind": "empirical_fisher_diag", "damping": 0.01}},
    ],
}


def sequence_data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as 8 tokens of 8 features (the transformer's input)."""
    return zoo.digits(split=split, n=n, shape="sequence")


# ZeRO-3 curvature on the partitions: an MLP (1.09M parameters) whose four 512x512 weights are partitioned (ZeRO-3 keeps
# parameters under 10^5 entries whole on every rank, so the biases and the small first/last layers persist),
# ZeRO-3 gathering one module at a time (no prefetch, release after use), and the finite-difference queries.
ZERO3_MODEL = {"in_features": 64, "hidden": (512,) * 5, "out_features": 10, "seed": 0}
#: the preconditioner under ZeRO-3: every parameter partitioned (no persistent small ones), one module gathered at a time
ZERO3_OPTIMIZER_CONFIG = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                          "stage3_max_live_parameters": 1000, "stage3_max_reuse_distance": 0}
ZERO3_CONFIG = {"stage": 3, "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 300_000,
                "stage3_max_reuse_distance": 0}
ZERO3_MONITOR = {
    "every": 2,
    "seed": 0,
    "fd_tol": 1e-5,  # each product's extrapolation stops at this error estimate (default 1e-6)
    "queries": [
        {"kind": "eigs", "name": "eigs_h", "k": 1, "curvature": "hessian", "tol": 1e-5},
        {"kind": "eigs", "name": "eigs_g", "k": 1, "curvature": "ggn", "tol": 1e-5},
        {"kind": "trace", "name": "trace_g", "curvature": "ggn", "method": "hutchpp", "matvecs": 9},
        # invariant queries on the partitions: Kronecker blocks owned per layer, diagonals on the pieces
        {"kind": "eigs", "name": "eigs_g_kflr", "k": 1, "curvature": "ggn", "tol": 1e-6,
         "metric": {"kind": "kflr", "damping": 0.1}},
        {"kind": "eigs", "name": "eigs_g_diag", "k": 1, "curvature": "ggn", "tol": 1e-6,
         "metric": {"kind": "diag_ggn", "damping": 0.1}},
    ],
}

# the slow companion of ZERO3_MONITOR on the same model (at its initial weights): the GGN's flatness in the sampled
# KFAC metric, the top eigenvalue in the sampled EKFAC metric, and the GGN metric solved by CG over finite-difference
# products
ZERO3_EXTRA_MONITOR = {
    "every": 1,
    "seed": 0,
    "fd_tol": 1e-5,
    "queries": [
        {"kind": "flatness", "name": "flat_kfac", "curvature": "ggn", "matvecs": 9, "probes": 2, "steps": 10,
         "logdet_damping": 0.1, "metric": {"kind": "kfac", "damping": 0.1, "options": {"mc_samples": 2, "seed": 4}}},
        # sampled EKFAC on the partitions (the labels of one process)
        {"kind": "eigs", "name": "eigs_g_ekfac", "k": 1, "curvature": "ggn", "tol": 1e-6,
         "metric": {"kind": "ekfac", "damping": 0.1, "options": {"mc_samples": 2, "seed": 4}}},
        # and the GGN metric solved by CG over finite-difference products (damped: a few CG steps per solve)
        {"kind": "eigs", "name": "eigs_g_cg", "k": 1, "curvature": "ggn", "tol": 1e-4,
         "metric": {"kind": "ggn", "damping": 1.0}},
    ],
}

# A tiny Hugging Face GPT-2 (head tied to the token embedding) under ZeRO-3: its top curvature directions sit on
# the zero-initialized projection biases, far stiffer than random ones (the case that needs the chosen step).
ZERO3_GPT2 = {"config": {"model_type": "gpt2", "vocab_size": 128, "n_positions": 32, "n_embd": 32, "n_layer": 3,
                         "n_head": 2}, "seed": 0}
ZERO3_GPT2_MONITOR = {
    "every": 1,
    "seed": 0,
    "loss": "causal_lm",
    "queries": [
        {"kind": "eigs", "name": "eigs_h", "k": 1, "curvature": "hessian", "tol": 1e-5},
        {"kind": "eigs", "name": "eigs_g", "k": 1, "curvature": "ggn", "tol": 1e-5},
        # invariant: KFLR with the tied embedding/head (its two uses' nearest Kronecker product)
        {"kind": "eigs", "name": "eigs_g_kflr", "k": 1, "curvature": "ggn", "tol": 1e-6,
         "metric": {"kind": "kflr", "damping": 0.1}},
        # EKFAC (type 2): bases formed at the owners, broadcast for one correction pass
        {"kind": "eigs", "name": "eigs_g_ekfac", "k": 1, "curvature": "ggn", "tol": 1e-6,
         "metric": {"kind": "ekfac", "damping": 0.1, "options": {"fisher_type": "type2"}}},
    ],
}


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 sequences of 16 tokens (no padding) for the tiny GPT-2: (input ids, causal labels)."""
    b = zoo.markov_corpus(n=8, vocab_size=128, max_length=16, min_length=16, seed=0)
    return b["input_ids"], b["labels"]
