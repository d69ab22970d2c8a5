"""Configuration of VD's grouped diffuser: the original constructor arguments of each stream
(`configs/model/openai_unet.yaml`), normalised and validated, and the layer plan they imply.

`StreamConfig.from_dict` parses one stream's arguments (`UNetModel2D_Next` '2d' or
`UNetModel0D_Next` '0d'); `plan_stream` gives its layer order and block widths as
`UNetModel*_Next.__init__` builds them (SHI-Labs `lib/model_zoo/openaimodel.py`);
`DiffuserConfig` holds every stream and checks that they can be swapped (`vd.py:313-320`).
The network is `vd_jax.models.unet.Diffuser`; the converter reads the plan here too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import flax.linen as nn

PARTS = ('global', 'data', 'context')
KINDS = ('2d', '0d')


# The original constructor arguments each kind accepts (configs/model/openai_unet.yaml).
_ARGS_2D = {'in_channels', 'out_channels', 'model_channels', 'num_res_blocks',
            'attention_resolutions', 'channel_mult', 'num_heads', 'num_head_channels',
            'context_dim', 'parts', 'use_checkpoint', 'dropout', 'conv_resample'}
_ARGS_0D = {'input_channels', 'output_channels', 'model_channels', 'num_noattn_blocks',
            'channel_mult', 'second_dim', 'with_attn', 'num_heads', 'num_head_channels',
            'context_dim', 'parts', 'use_checkpoint'}


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One diffuser stream, normalised from the original arguments of either kind."""
    name: str                      # modality: 'image' | 'text' (any identifier)
    kind: str                      # '2d' = UNetModel2D_Next, '0d' = UNetModel0D_Next
    parts: Tuple[str, ...]         # subset of ('global', 'data', 'context')
    in_channels: int               # latent width: 4 (image) / 768 (text)
    out_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: Tuple[int, ...]  # per level ('num_noattn_blocks' for '0d')
    attn_levels: Tuple[bool, ...]    # per level: has context layers
    num_heads: Optional[int] = 8
    num_head_channels: Optional[int] = None
    context_dim: int = 768
    second_dim: int = 1            # '0d' only: S positions of the hidden state

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> 'StreamConfig':
        """Build from the original argument names (plus `kind`)."""
        d = dict(d)
        kind = d.pop('kind', None)
        if kind not in KINDS:
            raise ValueError(f"diffuser stream '{name}': kind must be one of {KINDS}, got {kind!r}")
        allowed = _ARGS_2D if kind == '2d' else _ARGS_0D
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"diffuser stream '{name}' ({kind}): unknown argument(s) {unknown}; "
                             f"allowed: {sorted(allowed)}")
        parts = d.get('parts', list(PARTS))
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise ValueError(f"diffuser stream '{name}': unknown part(s) {bad}; allowed {PARTS}")
        mult = tuple(int(m) for m in d['channel_mult'])
        n = len(mult)

        def per_level(key, value):
            v = (value,) * n if isinstance(value, int) else tuple(value)
            if len(v) != n:
                raise ValueError(f"diffuser stream '{name}': {key} has {len(v)} entries but "
                                 f"channel_mult has {n} levels")
            return v

        if kind == '2d':
            if d.get('dropout', 0) != 0:
                raise ValueError(f"diffuser stream '{name}': dropout={d['dropout']} is not "
                                 "supported (the released models use 0)")
            if not d.get('conv_resample', True):
                raise ValueError(f"diffuser stream '{name}': conv_resample=False is not supported")
            attn_res = tuple(d.get('attention_resolutions', ()))
            attn = tuple((2 ** lvl) in attn_res for lvl in range(n))
            return cls(name=name, kind=kind, parts=parts, in_channels=int(d['in_channels']),
                       out_channels=int(d['out_channels']),
                       model_channels=int(d['model_channels']), channel_mult=mult,
                       num_res_blocks=per_level('num_res_blocks', d['num_res_blocks']),
                       attn_levels=attn, num_heads=d.get('num_heads', 8),
                       num_head_channels=d.get('num_head_channels'),
                       context_dim=int(d.get('context_dim', 768)))
        sd = per_level('second_dim', d.get('second_dim', 4))
        if len(set(sd)) != 1:
            # The original concatenates skips of one level with hidden states of the level
            # below (openaimodel.py:2940), which only works when every level has the same S.
            raise ValueError(f"diffuser stream '{name}': second_dim must be equal at every "
                             f"level, got {list(sd)}")
        ic = d['input_channels']
        oc = d['output_channels']
        return cls(name=name, kind=kind, parts=parts,
                   in_channels=int(np.prod(ic)), out_channels=int(np.prod(oc)),
                   model_channels=int(d['model_channels']), channel_mult=mult,
                   num_res_blocks=per_level('num_noattn_blocks', d.get('num_noattn_blocks', 2)),
                   attn_levels=tuple(bool(a) for a in per_level('with_attn', d['with_attn'])),
                   num_heads=d.get('num_heads', 8), num_head_channels=d.get('num_head_channels'),
                   context_dim=int(d.get('context_dim', 768)), second_dim=int(sd[0]))

    def heads(self, channels: int) -> Tuple[int, int]:
        """(n_heads, d_head) at a width, as `get_d_head_n_heads`."""
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError(f"diffuser stream '{self.name}': set exactly one of num_heads / "
                             "num_head_channels")
        if self.num_head_channels is None:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One data or context layer: what it is and its widths (the converter reads these too)."""
    type: str          # data: conv_in|res|down|up|out (2d), linear_in|fc|down|up|out (0d);
    cin: int           #       context: transformer
    cout: int
    heads: int = 0
    d_head: int = 0


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    order: str                         # 'd' data, 'c' context, 's' push skip, 'l' pop+concat
    data: Tuple[BlockSpec, ...]
    context: Tuple[BlockSpec, ...]


def plan_stream(s: StreamConfig) -> StreamPlan:
    """The layer order and block widths of a stream (`UNetModel*_Next.__init__`)."""
    order, data, ctx = [], [], []

    def d(type_, cin, cout):
        data.append(BlockSpec(type_, cin, cout))
        order.append('d')

    def c(ch):
        h, dh = s.heads(ch)
        ctx.append(BlockSpec('transformer', ch, ch, h, dh))
        order.append('c')

    mc = s.model_channels
    d('conv_in' if s.kind == '2d' else 'linear_in', s.in_channels, mc)
    order.append('s')
    skips = [mc]
    ch = mc
    n = len(s.channel_mult)
    for lvl, mult in enumerate(s.channel_mult):
        for _ in range(s.num_res_blocks[lvl]):
            d('res' if s.kind == '2d' else 'fc', ch, mult * mc)
            ch = mult * mc
            if s.attn_levels[lvl]:
                c(ch)
            skips.append(ch)
            order.append('s')
        if lvl != n - 1:
            d('down', ch, ch)
            skips.append(ch)
            order.append('s')
    d('res' if s.kind == '2d' else 'fc', ch, ch)
    c(ch)
    d('res' if s.kind == '2d' else 'fc', ch, ch)
    for lvl in reversed(range(n)):
        mult = s.channel_mult[lvl]
        for _ in range(s.num_res_blocks[lvl] + 1):
            order.append('l')
            d('res' if s.kind == '2d' else 'fc', ch + skips.pop(), mult * mc)
            ch = mult * mc
            if s.attn_levels[lvl]:
                c(ch)
        if lvl != 0:
            d('up', ch, ch)
    d('out', ch, s.out_channels)
    return StreamPlan(''.join(order), tuple(data), tuple(ctx))


@dataclasses.dataclass(frozen=True)
class DiffuserConfig:
    """The whole diffuser: its streams and which one owns the global (time) layers."""
    streams: Tuple[StreamConfig, ...]
    global_layer_ptr: str = 'image'

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'DiffuserConfig':
        """From a config section `{'global_layer_ptr': ..., 'streams': {name: {...}}}`."""
        d = dict(d)
        streams = tuple(StreamConfig.from_dict(k, v) for k, v in dict(d['streams']).items())
        cfg = cls(streams=streams, global_layer_ptr=d.get('global_layer_ptr', 'image'))
        cfg.validate()
        return cfg

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no diffuser stream '{name}' in this config (streams: {self.names})")

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    def with_part(self, part: str) -> Tuple[str, ...]:
        return tuple(s.name for s in self.streams if part in s.parts)

    def validate(self) -> None:
        reserved = set(dir(nn.Module)) | {'config', 'dtype', 'param_dtype', 'remat'}
        for s in self.streams:
            if not s.name.isidentifier() or s.name in reserved:
                raise ValueError(f"diffuser stream name {s.name!r} must be a Python identifier "
                                 "and not a Module attribute")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f'duplicate diffuser stream names: {self.names}')
        g = self.stream(self.global_layer_ptr)
        if 'global' not in g.parts:
            raise ValueError(f"global_layer_ptr '{self.global_layer_ptr}' names a stream without "
                             f"the 'global' part (parts: {g.parts})")
        plans = {s.name: plan_stream(s) for s in self.streams}
        orders = {p.order for p in plans.values()}
        if len(orders) != 1:
            # check_diffuser (vd.py:313-320): swapping streams needs one shared layer order.
            raise ValueError('all diffuser streams must share one layer order; got ' +
                             ', '.join(f'{k}: {p.order}' for k, p in plans.items()))
        widths = {k: [b.cin for b in p.context] for k, p in plans.items()}
        if len({tuple(w) for w in widths.values()}) != 1:
            raise ValueError(f'context layer widths differ between streams: {widths}')
        for s in self.streams:
            if 'data' in s.parts and s.time_embed_dim != g.time_embed_dim:
                raise ValueError(f"stream '{s.name}' expects a {s.time_embed_dim}-d time embedding "
                                 f"but the global stream '{g.name}' makes {g.time_embed_dim}")
            if s.kind == '0d':
                for ch in {s.model_channels * m for m in s.channel_mult}:
                    if ch % 32:
                        raise ValueError(f"stream '{s.name}': width {ch} is not a multiple of 32 "
                                         "(GroupNorm groups)")
