"""Language models and token data made from code: Hugging Face ``transformers`` models built from a config (random,
seeded initialization) or from a local directory, and a seeded synthetic corpus. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..integrations.hf import import_transformers

IGNORE_INDEX = -100


def _build(task: str, config: Mapping[str, Any] | None, path: str | None, seed: int, attn_implementation: str,
           dtype: str | torch.dtype | None) -> nn.Module:
    transformers = import_transformers()
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "sequence_classification": transformers.AutoModelForSequenceClassification}[task]
    if (config is None) == (path is None):
        raise ConfigError("give exactly one of config (a dict with model_type and sizes) and path (a local "
                          "directory with a saved model)")
    if path is not None:
        if not Path(path).is_dir():
            raise ConfigError(f"path {path!r} is not a local directory (nothing is downloaded)")
        model = auto.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    else:
        cfg = dict(config)  # type: ignore[arg-type]
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ConfigError("config needs a model_type (e.g. gpt2, llama, bert)")
        cfg.setdefault("use_cache", False)
        try:
            defaults = transformers.AutoConfig.for_model(model_type)
            vocab = cfg.get("vocab_size", defaults.vocab_size)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a default id outside a small vocabulary
                default = getattr(defaults, key, None)
                if key not in cfg and isinstance(default, int) and default >= vocab:
                    cfg[key] = None
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
        hf_config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(hf_config)
    model.config.use_cache = False
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def hf_causal_lm(config: Mapping[str, Any] | None = None, path: str | None = None, seed: int = 0,
                 attn_implementation: str = "eager", dtype: str | torch.dtype | None = None) -> nn.Module:
    """A ``transformers`` causal language model (``AutoModelForCausalLM``), in eval mode.

    ``config``: ``model_type`` (``gpt2``, ``llama``, …) plus the sizes of that model's config, e.g. ``{model_type:
    gpt2, vocab_size: 64, n_positions: 32, n_embd: 32, n_layer: 2, n_head: 2}``; the weights are initialized at
    random from ``seed`` (the caller's random state is left alone). ``path``: a local directory saved with
    ``save_pretrained`` (``local_files_only``). ``attn_implementation``: ``eager`` (default: differentiable by
    every transform) or ``sdpa`` (curvdist runs it on the math kernel inside products). Dropout is off (eval).
    """
    return _build("causal_lm", config, path, seed, attn_implementation, dtype)


def hf_sequence_classifier(config: Mapping[str, Any] | None = None, path: str | None = None, seed: int = 0,
                           attn_implementation: str = "eager", dtype: str | torch.dtype | None = None) -> nn.Module:
    """A ``transformers`` sequence classifier (``AutoModelForSequenceClassification``; ``num_labels`` in the
    config), in eval mode; as :func:`hf_causal_lm`. Use it with ``loss: cross_entropy`` and one label per
    sequence."""
    return _build("sequence_classification", config, path, seed, attn_implementation, dtype)


def markov_corpus(n: int = 32, vocab_size: int = 64, max_length: int = 32, min_length: int | None = None,
                  seed: int = 0, pad_token_id: int = 0, successors: int = 8, labels: str = "causal"
                  ) -> dict[str, Tensor]:
    """A seeded synthetic token corpus: ``n`` sequences from a random first-order Markov chain over
    ``vocab_size`` tokens in which every token has ``successors`` possible next tokens (drawn at random, with
    Dirichlet(1) probabilities; memory O(vocab_size · successors), so GPT-2's 50,257 tokens are fine), of lengths
    uniform in [``min_length``, ``max_length``], right-padded with ``pad_token_id``.

    Returns ``{"input_ids": (n, max_length), "attention_mask": (n, max_length), "labels": (n, max_length)}`` with
    labels = input ids at real tokens and −100 at padding (``labels="causal"``, for the ``causal_lm`` loss), or
    the next token at each real position and −100 elsewhere (``labels="next"``, for ``token_cross_entropy``).
    """
    min_length = max_length // 2 if min_length is None else min_length
    if not 2 <= min_length <= max_length:
        raise DataError(f"need 2 <= min_length <= max_length, got {min_length} and {max_length}")
    if n <= 0 or vocab_size < 2 or successors < 1:
        raise DataError(f"need n >= 1, vocab_size >= 2 and successors >= 1, got {n}, {vocab_size}, {successors}")
    if labels not in ("causal", "next"):
        raise DataError(f"labels must be 'causal' or 'next', got {labels!r}")
    g = torch.Generator().manual_seed(seed)
    k = min(successors, vocab_size)
    nxt = torch.randint(0, vocab_size, (vocab_size, k), generator=g)
    prob = -torch.log(torch.rand(vocab_size, k, generator=g, dtype=torch.float64))  # Dirichlet(1) up to scale
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
    ids = torch.full((n, max_length), pad_token_id, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab_size, (n,), generator=g)
    for t in range(1, max_length):
        choice = torch.multinomial(prob[ids[:, t - 1]], 1, generator=g).squeeze(1)
        ids[:, t] = nxt[ids[:, t - 1], choice]
    mask = (torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
    target = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    if labels == "next":
        target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], IGNORE_INDEX)], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "labels": target}
