"""Training config helpers: command-line overrides, flows, and the hashable step settings.

A training config is a `ml_collections.ConfigDict` from `configs/train_*.py` (see
`configs/train_common.py` for every key). `apply_overrides` edits it from `key=value`
strings; `StepConfig.from_config` turns the parts the jitted step depends on into a frozen,
hashable dataclass, passed to `jax.jit` as a static argument: two runs with equal settings
(a resumed run, the tests' several runs) then share one compiled program.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any, Mapping, Sequence, Tuple

import ml_collections

from vd_jax import modalities as M
from vd_jax.diffusion.schedule import ScheduleConfig
from vd_jax.errors import ConfigError
from vd_jax.sharding import normalize_rules
from vd_jax.train import objectives
from vd_jax.train.optim import OptimConfig



# ----------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------

def _all_keys(cfg, prefix='') -> list:
    out = []
    for k, v in cfg.items():
        key = f'{prefix}{k}'
        out.append(key)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_all_keys(v, key + '.'))
    return out


def _parse(text: str, current: Any, key: str) -> Any:
    """`text` as a value of the type of `current` (str stays raw; others via literal_eval)."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"override {key}={text!r}: cannot parse the value as a "
                          f'{type(current).__name__}') from None
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(current)(value)
        if isinstance(value, str):
            return type(current)([value])
    elif isinstance(current, ml_collections.ConfigDict):
        if isinstance(value, Mapping):
            return value
    else:
        return value
    raise ConfigError(f'override {key}={text!r}: expected a {type(current).__name__} '
                      f'(current value {current!r}), got {type(value).__name__}')


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]):
    """Apply 'a.b.c=value' (or '--config.a.b.c=value') strings to `cfg`, in place.

    Keys must exist (a mistyped key fails and names the closest existing keys); the value is
    parsed to the type of the current one: str raw, everything else with `ast.literal_eval`
    (`1e-4`, `True`, `[1, 2]`, `('data', 'fsdp')`, `None`).
    """
    for item in overrides:
        text = item[2:] if item.startswith('--') else item
        if text.startswith('config.'):
            text = text[len('config.'):]
        if '=' not in text:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value_text = text.split('=', 1)
        parts = key.split('.')
        node = cfg
        for i, p in enumerate(parts):
            is_last = i == len(parts) - 1
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or p not in node:
                where = '.'.join(parts[:i]) or '<top>'
                keys = _all_keys(cfg)
                close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
                hint = f'; did you mean {close}?' if close else ''
                raise ConfigError(f"override {item!r}: no key '{key}' in the config "
                                  f"('{p}' not found under {where}){hint}")
            if is_last:
                value = _parse(value_text, node[p], key)
                try:
                    node[p] = value  # an existing key: allowed even in a locked ConfigDict
                except TypeError as e:  # ConfigDict's own type check
                    raise ConfigError(f'override {item!r}: {e}') from None
            else:
                node = node[p]
    return cfg


# ----------------------------------------------------------------------------------------
# Flows
# ----------------------------------------------------------------------------------------

def parse_flows(cfg) -> Tuple[M.Flow, ...]:
    """A `Flow` (name, xtype, ctype, weight) per flow in `cfg.flows`, checked against the model."""
    names = cfg.flows
    if isinstance(names, str):
        names = [n.strip() for n in names.split(',') if n.strip()]
    names = list(names)
    if not names:
        raise ConfigError('config flows is empty: train at least one of ' + ', '.join(M.FLOWS))
    if len(set(names)) != len(names):
        raise ConfigError(f'config flows lists a flow twice: {names}')
    weights = dict(cfg.get('flow_weights', {}) or {})
    unknown = [n for n in list(names) + list(weights) if n not in M.FLOWS]
    if unknown:
        raise ConfigError(f'unknown flow(s) {unknown}; known flows: '
                          + ', '.join(f'{f.name} ({f.ctype}->{f.xtype})' for f in M.FLOWS.values()))
    streams = dict(cfg.model.diffuser.streams)
    out = []
    for n in names:
        xtype, ctype = M.FLOWS[n].xtype, M.FLOWS[n].ctype
        for role, s, part in (('output', xtype, 'data'), ('context', ctype, 'context')):
            parts = list(streams.get(s, {}).get('parts', ())) if s in streams else []
            if part not in parts:
                raise ConfigError(f"flow '{n}' needs the {part} layers of stream '{s}' ({role} "
                                  f'{s}), which model {cfg.model.get("name", "?")!r} does not have')
        w = float(weights.get(n, 1.0))
        if not w >= 0:
            raise ConfigError(f"flow_weights.{n} = {w}: weights must be >= 0")
        out.append(M.FLOWS[n]._replace(weight=w))
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Hashable step settings
# ----------------------------------------------------------------------------------------

def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the jitted train step depends on (a static, hashable jit argument).

    `objective` (`vd_jax.train.objectives`) is what is optimised; for the diffuser it is
    derived from model / flows / schedule / fixed_noise when not given."""
    model: Any                                   # vd_jax.models.unet.Diffuser (or None)
    flows: Tuple[M.Flow, ...]                    # plain (name, xtype, ctype, weight) tuples are coerced
    schedule: Any                                # ScheduleConfig (a legacy (start, end, T) is coerced)
    optim: OptimConfig
    ema_decay: float = 0.9999
    ema_use_num_updates: bool = True
    microbatches: int = 1
    fixed_noise: bool = False                    # t, eps independent of the step (tests)
    seed: int = 0
    rules: Tuple = ()
    objective: Any = None

    def __post_init__(self):
        object.__setattr__(self, 'schedule', ScheduleConfig.coerce(self.schedule))
        object.__setattr__(self, 'flows', tuple(map(M.flow, self.flows)))
        if self.objective is None:
            object.__setattr__(self, 'objective', objectives.Diffusion(
                self.model, self.flows, self.schedule, self.fixed_noise))

    @classmethod
    def from_config(cls, cfg, model) -> 'StepConfig':
        s = cfg.model.schedule
        ema = cfg.ema
        if not 0.0 <= float(ema.decay) < 1.0:
            raise ConfigError(f'ema.decay must be in [0, 1), got {ema.decay}')
        mb = int(cfg.microbatches)
        if mb < 1:
            raise ConfigError(f'microbatches must be >= 1, got {mb}')
        diffusion = str(cfg.get('objective', 'diffusion')) == 'diffusion'
        flows = parse_flows(cfg) if diffusion else ()
        try:
            schedule = ScheduleConfig.coerce(s)
        except ConfigError as e:  # name the key as the training config spells it
            raise ConfigError(f'model.{e}') from None
        return cls(model=model, flows=flows, schedule=schedule,
                   optim=OptimConfig.from_config(cfg), ema_decay=float(ema.decay),
                   ema_use_num_updates=bool(ema.use_num_updates), microbatches=mb,
                   fixed_noise=bool(cfg.noise.fixed), seed=int(cfg.seed),
                   rules=normalize_rules(cfg.logical_axis_rules),
                   objective=objectives.from_config(cfg, model, flows, schedule))


def needed_fields(flows) -> Tuple[str, ...]:
    """Batch fields a set of flows reads: latent_<xtype>, context_<ctype> and 'index' (the
    record index, which seeds each example's t and eps)."""
    fields = ['index']
    for flow in map(M.flow, flows):
        for f in (M.get(flow.xtype).latent_field, M.get(flow.ctype).context_field):
            if f not in fields:
                fields.append(f)
    return tuple(fields)


def to_plain(x) -> Any:
    """ConfigDict / FrozenConfigDict -> plain dicts and lists (for JSON)."""
    if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x

