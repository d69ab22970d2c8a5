"""Helpers every model family shares: config dataclasses from original/HF dicts, embeddings."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn

# Keys of original / HF config dicts that do not change the inference graph (dropouts, init
# scales, bookkeeping); accepted and ignored so a config.json can be passed as is.
IGNORED_CONFIG_KEYS = frozenset({
    'attention_dropout', 'dropout', 'initializer_range', 'initializer_factor', 'bos_token_id',
    'pad_token_id', 'model_type', 'architectures', 'torch_dtype', 'dtype',
    'transformers_version', '_name_or_path', 'attention_probs_dropout_prob',
    'hidden_dropout_prob', 'attn_pdrop', 'embd_pdrop', 'resid_pdrop', 'summary_first_dropout',
    'finetuning_task', 'num_labels', 'output_attentions', 'output_hidden_states', 'torchscript',
    'pretrained_config_archive_map', 'summary_activation', 'summary_proj_to_labels',
    'summary_type', 'summary_use_proj', 'pruned_heads'})


def config_from_dict(cls, d: Mapping[str, Any], what: str,
                     aliases: Optional[Mapping[str, str]] = None,
                     fixed: Optional[Mapping[str, Any]] = None):
    """A frozen config dataclass `cls` from an original/HF dict (or ConfigDict).

    aliases: other names of a field (`hidden_size` -> `n_embd`); both given must agree.
    fixed: keys that must have the released model's value if present.
    Unknown keys (not fields, not in `IGNORED_CONFIG_KEYS`) are an error naming them.
    """
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    for alias, field in (aliases or {}).items():
        if alias in d:
            val = d.pop(alias)
            if field in d and d[field] != val:
                raise ValueError(f'{what}: {alias}={val} contradicts {field}={d[field]}')
            d.setdefault(field, val)
    for k, v in (fixed or {}).items():
        if k in d and d.pop(k) != v:
            raise ValueError(f'{what}: only {k}={v!r} is supported (the released model)')
    if d.get('pruned_heads'):
        raise ValueError(f'{what}: pruned heads are not supported')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields - IGNORED_CONFIG_KEYS)
    if unknown:
        raise ValueError(f'{what}: unknown key(s) {unknown}; allowed: {sorted(fields)}')
    return cls(**{k: v for k, v in d.items() if k in fields})


def embed(num: int, features: int, dtype, param_dtype, axes) -> nn.Embed:
    """An embedding table whose leaf `embedding` (num, features) is PyTorch's
    `nn.Embedding.weight` as is; N(0, 0.02) init as HF."""
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, embedding_init=init)
