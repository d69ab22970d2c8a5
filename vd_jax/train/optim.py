"""Optimizer, learning-rate schedule, parameter groups with update multipliers, EMA.

Parameter groups follow VD's layer groups (`VD_v2_0.parameter_group`, `vd.py:108-112`):
`<g>/time_embed_*` (the global layers of the stream `global_layer_ptr` points at) = 'global';
`<s>/data_blocks_*` = '<s>_data'; `<s>/context_blocks_*` = '<s>_context' (e.g. 'image_data',
'text_context').

The multiplier of a group scales that group's *update* (after Adam, weight decay and the
learning rate), i.e. it is a per-group learning-rate scale. That is the only multiplier
mechanism the original code has (`set_lr(..., pg_lrscale={group: scale})`,
`common/get_scheduler.py:54-68`), and it is the one that survives Adam: a scale on the raw
gradient would be divided out again by Adam's second-moment normalisation. For plain SGD
(no momentum state subtleties) both views coincide: the update is linear in the gradient.
A multiplier of 0 freezes the group exactly (weight decay included).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax.checkpoint import path_str
from vd_jax.errors import ConfigError

_GROUP_RX = re.compile(r'^(?P<stream>[A-Za-z_][A-Za-z0-9_]*)/(?P<kind>time_embed|data_blocks|'
                       r'context_blocks)_\d+(/|$)')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (`cfg.optimizer`), hashable."""
    name: str = 'adamw'              # 'adamw' | 'sgd'
    lr: float = 1e-4
    schedule: str = 'constant'       # 'constant' | 'linear' | 'cosine' (after the warm-up)
    warmup_steps: int = 0
    decay_steps: int = 0             # steps of the decay after warm-up (0 for 'constant')
    end_lr_factor: float = 0.0       # final lr = lr * end_lr_factor (linear / cosine)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0            # sgd only
    grad_clip_norm: float = 0.0      # 0: no clipping
    multipliers: Tuple[Tuple[str, float], ...] = ()  # parameter group -> update multiplier

    @classmethod
    def from_config(cls, cfg) -> 'OptimConfig':
        oc = cfg.optimizer
        name = str(oc.name).lower()
        if name not in ('adamw', 'sgd'):
            raise ConfigError(f"optimizer.name must be 'adamw' or 'sgd', got {oc.name!r}")
        schedule = str(oc.schedule).lower()
        if schedule not in ('constant', 'linear', 'cosine'):
            raise ConfigError(f"optimizer.schedule must be constant|linear|cosine, got {oc.schedule!r}")
        warmup = int(oc.warmup_steps)
        total = int(cfg.total_steps)
        if warmup < 0 or (warmup >= total and schedule != 'constant'):
            raise ConfigError(f'optimizer.warmup_steps={warmup} must be >= 0 and below '
                              f'total_steps={total} for a decaying schedule')
        mults = tuple(sorted((str(k), float(v)) for k, v in dict(cfg.grad_multipliers).items()))
        for k, v in mults:
            if not v >= 0:
                raise ConfigError(f'grad_multipliers.{k} = {v}: must be >= 0')
        return cls(name=name, lr=float(oc.lr), schedule=schedule, warmup_steps=warmup,
                   decay_steps=0 if schedule == 'constant' else total - warmup,
                   end_lr_factor=float(oc.end_lr_factor), b1=float(oc.b1), b2=float(oc.b2),
                   eps=float(oc.eps), weight_decay=float(oc.weight_decay),
                   momentum=float(oc.get('momentum', 0.0)),
                   grad_clip_norm=float(oc.grad_clip_norm), multipliers=mults)


def group_of(path: str) -> str:
    """Parameter group of a '/'-joined diffuser parameter path."""
    m = _GROUP_RX.match(path)
    if not m:
        raise ConfigError(f"parameter '{path}' belongs to no group (expected <stream>/time_embed_*, "
                          '<stream>/data_blocks_* or <stream>/context_blocks_*)')
    kind = m.group('kind')
    if kind == 'time_embed':
        return 'global'
    return f"{m.group('stream')}_{'data' if kind == 'data_blocks' else 'context'}"


def group_tree(params: Any, group_fn=None) -> Any:
    """A tree like `params` whose leaves are the group names (`group_fn`, default `group_of`)."""
    fn = group_fn or group_of
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), params)


def groups_of(params: Any) -> Dict[str, int]:
    """{group: parameter count}."""
    counts: Dict[str, int] = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(params):
        g = group_of(path_str(p))
        counts[g] = counts.get(g, 0) + int(np.prod(np.shape(leaf)))
    return counts


def multiplier_tree(params: Any, multipliers: Mapping[str, float], group_fn=None) -> Any:
    """Per-leaf Python floats from {group: multiplier}; groups not named get 1.0.

    Naming a group the model does not have is an error (a typo would silently train
    everything at full rate otherwise). `group_fn(path)`: the groups (default: the
    diffuser's, `group_of`).
    """
    if not multipliers:
        return jax.tree_util.tree_map(lambda _: 1.0, params)
    groups = group_tree(params, group_fn)
    present = set(jax.tree_util.tree_leaves(groups))
    unknown = sorted(set(multipliers) - present)
    if unknown:
        raise ConfigError(f'grad_multipliers: unknown group(s) {unknown}; this model has groups '
                          f'{sorted(present)}')
    return jax.tree_util.tree_map(lambda g: float(multipliers.get(g, 1.0)), groups)


def scale_by_group(mults: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its (static) float; leaves with 1.0 are left untouched."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
                                        updates, mults)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def lr_schedule(oc: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant / linear / cosine decay
    to `lr * end_lr_factor` over `decay_steps`."""
    peak, end = oc.lr, oc.lr * oc.end_lr_factor
    if oc.schedule == 'constant':
        after = optax.constant_schedule(peak)
    elif oc.schedule == 'linear':
        after = optax.linear_schedule(peak, end, max(oc.decay_steps, 1))
    else:
        after = optax.cosine_decay_schedule(peak, max(oc.decay_steps, 1),
                                            alpha=oc.end_lr_factor)
    if oc.warmup_steps <= 0:
        return after
    warm = optax.linear_schedule(0.0, peak, oc.warmup_steps)
    return optax.join_schedules([warm, after], [oc.warmup_steps])


def _decay_mask(params):
    # No weight decay on biases and norm scales (1-D leaves): the usual AdamW practice.
    return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)


def make_optimizer(oc: OptimConfig, params: Any, group_fn=None) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW / SGD with the lr schedule -> per-group multipliers.

    `params` (arrays or ShapeDtypeStructs) only fixes the group structure.
    """
    lr = lr_schedule(oc)
    chain = []
    if oc.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(oc.grad_clip_norm))
    if oc.name == 'adamw':
        chain.append(optax.adamw(lr, b1=oc.b1, b2=oc.b2, eps=oc.eps,
                                 weight_decay=oc.weight_decay, mask=_decay_mask))
    else:
        chain.append(optax.sgd(lr, momentum=oc.momentum or None))
        if oc.weight_decay:
            raise ConfigError('optimizer.weight_decay is only supported with adamw')
    chain.append(scale_by_group(multiplier_tree(params, dict(oc.multipliers), group_fn)))
    return optax.chain(*chain)


def ema_decay_at(decay: float, use_num_updates: bool, num_updates):
    """EMA decay after `num_updates` updates: `min(decay, (1 + n) / (10 + n))` with
    `use_num_updates` (LitEma, `ema.py:4-11`), so early averages are not dominated by the
    random init; else the constant `decay`."""
    if not use_num_updates:
        return jnp.asarray(decay, jnp.float32)
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay) -> Any:
    """ema <- ema - (1 - decay) * (ema - params), leafwise in the parameters' dtype."""
    return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay).astype(e.dtype) * (e - p),
                                  ema, params)
