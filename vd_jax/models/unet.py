"""The grouped Versatile Diffusion diffuser (SHI-Labs `lib/model_zoo/openaimodel.py`
`UNetModel2D_Next` / `UNetModel0D_Next`, run as in `lib/model_zoo/vd.py:VD_v2_0.apply_model`).

VD's diffuser is a bank of *streams*, one per modality. A stream may own
  * global layers: the time-embedding MLP (owned by one stream, `global_layer_ptr`),
  * data layers: ResBlocks on image latents ('2d') or FCResBlocks on Optimus text
    latents ('0d'), used when that modality is the *output*,
  * context layers: SD cross-attention transformers, used when that modality is the
    *condition*.
A flow picks data layers by output type and context layers by context type, and walks
the one layer order that every stream shares (`layer_order`, checked by `check_diffuser`,
`vd.py:313-320`). Everything is channels-last: image hidden states are (B, H, W, C), text
hidden states are (B, S, 1, C) with S = `second_dim` "positions" (PyTorch's (B, C, S, 1)).

Parameter paths mirror the v1.0 state dict: `diffuser.image.data_blocks.3.0.op.weight`
lives at `image/data_blocks_3/op/kernel`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.layers import (Conv, Dense, GroupNorm, LayerNorm, Upsample, attention,
                                  group_norm_stats, timestep_embedding)

Dtype = Any
PARTS = ('global', 'data', 'context')
KINDS = ('2d', '0d')


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """Image data layer (`openaimodel.ResBlock`, use_scale_shift_norm=False)."""
    channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.in_layers_0 = GroupNorm(32, 1e-5, **kw)
        self.in_layers_2 = Conv(self.out_channels, 3, 1, 1, **kw)
        self.emb_layers_1 = Dense(self.out_channels, **kw)
        self.out_layers_0 = GroupNorm(32, 1e-5, **kw)
        self.out_layers_3 = Conv(self.out_channels, 3, 1, 1, zero_init=True, **kw)
        if self.channels != self.out_channels:
            self.skip_connection = Dense(self.out_channels, **kw)  # 1x1 conv

    def __call__(self, x, emb):  # x (B,H,W,Cin), emb (B,E)
        h = self.in_layers_2(nn.silu(self.in_layers_0(x)))
        h = h + self.emb_layers_1(nn.silu(emb))[:, None, None, :]
        h = self.out_layers_3(nn.silu(self.out_layers_0(h)))
        skip = self.skip_connection(x) if self.channels != self.out_channels else x
        return skip + h


class FlatGroupNorm(nn.Module):
    """GroupNorm of `FCBlock_MultiDim`: 32 groups over the flattened C*S vector.

    With C divisible by 32 a group is C/32 whole channels at every position, so the
    statistics equal a per-channel GroupNorm on (B, S, C); the affine is per flattened
    feature (C*S entries, stored in our (s, c) order; the converter permutes).
    """
    second_dim: int
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x (B, S*C), s-major
        b, n = x.shape
        s = self.second_dim
        xf, mean, var = group_norm_stats(x.reshape(b, s, n // s), self.num_groups)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(b, n)
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)),
                           (n,), self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (ax.NORM,)),
                          (n,), self.param_dtype)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class FCBlock(nn.Module):
    """Text data layer (`FCBlock_MultiDim`): an MLP ResBlock on the flattened (S, C) state."""
    channels: int
    out_channels: int
    second_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = self.second_dim
        self.in_layers_0 = FlatGroupNorm(s, **kw)
        self.in_layers_2 = Dense(s * self.out_channels, **kw)
        self.emb_layers_1 = Dense(s * self.out_channels, **kw)
        self.out_layers_0 = FlatGroupNorm(s, **kw)
        self.out_layers_3 = Dense(s * self.out_channels, zero_init=True, **kw)
        if self.channels != self.out_channels:
            self.skip_connection = Dense(s * self.out_channels, **kw)

    def __call__(self, x, emb):  # x (B, S, 1, Cin), emb (B, E)
        b = x.shape[0]
        # pin the flat (B, S*C) values to batch sharding: without it, a pure-FSDP mesh makes
        # XLA rematerialise these in the backward pass ("involuntary full rematerialization")
        flat = lambda v: nn.with_logical_constraint(v, (ax.BATCH, ax.ACT_EMBED))
        x = flat(x.reshape(b, int(np.prod(x.shape[1:]))))  # (B, S*Cin), s-major
        h = flat(self.in_layers_2(nn.silu(self.in_layers_0(x))))
        h = h + self.emb_layers_1(nn.silu(emb))
        h = flat(self.out_layers_3(nn.silu(self.out_layers_0(h))))
        skip = self.skip_connection(x) if self.channels != self.out_channels else x
        return (skip + h).reshape(b, self.second_dim, 1, self.out_channels)


class Downsample(nn.Module):
    """Strided 3x3 conv (key `op`)."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.op = Conv(self.channels, 3, 2, 1, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, emb):
        return self.op(x)


class ConvIn(nn.Module):
    """First image data layer: a bare 3x3 conv (`data_blocks.0.0`)."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        return Conv(self.channels, 3, 1, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='conv')(x)


class LinearMultiDim(nn.Module):
    """Text stream dense layer (`Linear_MultiDim`) between (B, S_in*C_in) and (B, S_out*C_out).

    `in_positions`/`out_positions` give S of each side: 1 for the plain latent, else
    `second_dim`. Output is reshaped to (B, S, 1, C) when out_positions > 1.
    """
    features: int
    out_positions: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb=None):
        b = x.shape[0]
        y = Dense(self.features * self.out_positions, zero_init=self.zero_init, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='linear')(x.reshape(b, int(np.prod(x.shape[1:]))))
        if self.out_positions == 1:
            return y
        return y.reshape(b, self.out_positions, 1, self.features)


class OutBlock(nn.Module):
    """Last data layer: GroupNorm, SiLU, then conv3x3 (2d) or dense (0d); keys `.0` / `.2`."""
    kind: str
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.out_0 = GroupNorm(32, 1e-5, **kw)
        if self.kind == '2d':
            self.out_2 = Conv(self.out_channels, 3, 1, 1, zero_init=True, **kw)
        else:
            self.out_2 = Dense(self.out_channels, zero_init=True, **kw)

    def __call__(self, x, emb):
        h = nn.silu(self.out_0(x))
        if self.kind == '0d':
            h = h.reshape(h.shape[0], int(np.prod(h.shape[1:])))  # (B, S*C), s-major
        return self.out_2(h)


class CrossAttention(nn.Module):
    """`attention.CrossAttention`: bias-free q/k/v, biased output projection."""
    query_dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = 'auto'

    def setup(self):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = Dense(inner, use_bias=False, **kw)
        self.to_k = Dense(inner, use_bias=False, **kw)
        self.to_v = Dense(inner, use_bias=False, **kw)
        self.to_out_0 = Dense(self.query_dim, **kw)

    def __call__(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                        dtype=self.dtype, implementation=self.attention)
        return self.to_out_0(out)


class GEGLU(nn.Module):
    dim_out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.proj = Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.net_0 = GEGLU(self.dim * self.mult, **kw)
        self.net_2 = Dense(self.dim, **kw)

    def __call__(self, x):
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = 'auto'

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attn1 = CrossAttention(self.dim, self.heads, self.dim_head, **kw,
                                    attention=self.attention)
        self.ff = FeedForward(self.dim, **kw)
        self.attn2 = CrossAttention(self.dim, self.heads, self.dim_head, **kw,
                                    attention=self.attention)
        self.norm1 = LayerNorm(1e-5, **kw)
        self.norm2 = LayerNorm(1e-5, **kw)
        self.norm3 = LayerNorm(1e-5, **kw)

    def __call__(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Context layer (`attention.SpatialTransformer`, depth 1, SD-v1 style)."""
    channels: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = 'auto'

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        self.norm = GroupNorm(32, 1e-6, **kw)  # `Normalize`: eps 1e-6, unlike the ResBlocks
        self.proj_in = Dense(inner, **kw)       # 1x1 conv
        self.transformer_blocks = [BasicTransformerBlock(inner, self.heads, self.dim_head, **kw,
                                                         attention=self.attention)]
        self.proj_out = Dense(self.channels, zero_init=True, **kw)

    def __call__(self, x, context):  # x (B, H, W, C) or (B, S, 1, C); context (B, L, D)
        b, hh, ww, c = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(b, hh * ww, h.shape[-1])
        for blk in self.transformer_blocks:
            h = blk(h, context.astype(self.dtype))
        h = self.proj_out(h).reshape(b, hh, ww, c)
        return h + x


# ----------------------------------------------------------------------------------------
# Streams and the diffuser
# ----------------------------------------------------------------------------------------

def _data_block(s: StreamConfig, spec: BlockSpec, kw, remat: bool):
    res_cls = nn.remat(ResBlock) if remat else ResBlock
    fc_cls = nn.remat(FCBlock) if remat else FCBlock
    if s.kind == '2d':
        if spec.type == 'conv_in':
            return ConvIn(spec.cout, **kw)
        if spec.type == 'res':
            return res_cls(spec.cin, spec.cout, **kw)
        if spec.type == 'down':
            return Downsample(spec.cout, **kw)
        if spec.type == 'up':
            return Upsample(spec.cout, **kw)
        return OutBlock('2d', spec.cout, **kw)
    sd = s.second_dim
    if spec.type == 'linear_in':
        return LinearMultiDim(spec.cout, sd, **kw)
    if spec.type == 'fc':
        return fc_cls(spec.cin, spec.cout, sd, **kw)
    if spec.type in ('down', 'up'):
        return LinearMultiDim(spec.cout, sd, **kw)
    return OutBlock('0d', spec.cout, **kw)


class DiffuserStream(nn.Module):
    """The layers one modality owns: `time_embed` (global), `data_blocks`, `context_blocks`."""
    config: StreamConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = 'auto'

    def setup(self):
        s = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        plan = plan_stream(s)
        if 'global' in s.parts:
            self.time_embed_0 = Dense(s.time_embed_dim, **kw)
            self.time_embed_2 = Dense(s.time_embed_dim, **kw)
        if 'data' in s.parts:
            self.data_blocks = [_data_block(s, b, kw, self.remat) for b in plan.data]
        if 'context' in s.parts:
            st = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
            self.context_blocks = [st(b.cin, b.heads, b.d_head, **kw, attention=self.attention)
                                   for b in plan.context]

    def embed_time(self, t):
        """Global layers: t (B,) -> (B, 4*model_channels)."""
        emb = timestep_embedding(t, self.config.model_channels).astype(self.dtype)
        return self.time_embed_2(nn.silu(self.time_embed_0(emb)))


def _constrain(h):
    names = ((ax.BATCH, ax.ACT_EMBED) if h.ndim == 2 else
             (ax.BATCH, ax.HEIGHT, ax.WIDTH, ax.ACT_EMBED))
    return nn.with_logical_constraint(h, names)


class Diffuser(nn.Module):
    """VD's multi-stream diffuser. One call runs one flow or a mix of contexts.

    Attributes:
      config: a `DiffuserConfig` (or the config section it is built from).
      dtype: compute dtype; parameters stay `param_dtype`; outputs are float32.
      remat: rematerialise ResBlocks/FCBlocks/transformers in the backward pass.
      attention: 'auto' (on GPU/TPU 'fused'; on CPU blockwise online softmax above
        `layers.BLOCKWISE_MIN_KEYS` keys, i.e. the self-attention of 32x32 and 64x64
        latents, dense below), 'dense', 'blockwise' or 'fused' (`jax.nn.dot_product_attention`).
        Same values either way (`layers.attention`); blockwise bounds memory and is faster on CPU.
    """
    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = 'auto'

    def __post_init__(self):
        if not isinstance(self.config, DiffuserConfig):
            object.__setattr__(self, 'config', DiffuserConfig.from_dict(self.config))
        super().__post_init__()

    def setup(self):
        for s in self.config.streams:
            setattr(self, s.name, DiffuserStream(s, self.dtype, self.param_dtype, self.remat,
                                                 self.attention))

    # -- helpers ---------------------------------------------------------------------------
    def _check(self, x, xtype: str, contexts, ctypes):
        cfg = self.config
        if xtype not in cfg.with_part('data'):
            raise ValueError(f"xtype '{xtype}' has no data layers in this diffuser (streams with "
                             f"data layers: {cfg.with_part('data')})")
        s = cfg.stream(xtype)
        if s.kind == '2d':
            f = 2 ** (len(s.channel_mult) - 1)
            if x.ndim != 4 or x.shape[-1] != s.in_channels:
                raise ValueError(f"x for '{xtype}' must be (B, H, W, {s.in_channels}) channels-last, "
                                 f"got {x.shape}")
            if x.shape[1] % f or x.shape[2] % f:
                raise ValueError(f"latent size {x.shape[1]}x{x.shape[2]} must be divisible by {f} "
                                 f"({len(s.channel_mult)} levels)")
        elif x.ndim != 2 or x.shape[-1] != s.in_channels:
            raise ValueError(f"x for '{xtype}' must be (B, {s.in_channels}), got {x.shape}")
        for c, ct in zip(contexts, ctypes):
            if ct not in cfg.with_part('context'):
                raise ValueError(f"ctype '{ct}' has no context layers in this diffuser (streams "
                                 f"with context layers: {cfg.with_part('context')})")
            cd = cfg.stream(ct).context_dim
            if c.ndim != 3 or c.shape[0] != x.shape[0] or c.shape[-1] != cd:
                raise ValueError(f"context for '{ct}' must be (B={x.shape[0]}, L, {cd}), got {c.shape}")

    def _run(self, x, t, xtype: str, context_op: Callable):
        cfg = self.config
        emb = getattr(self, cfg.global_layer_ptr).embed_time(jnp.broadcast_to(t, x.shape[:1]))
        data = getattr(self, xtype).data_blocks
        order = plan_stream(cfg.stream(xtype)).order
        h, hs, di, ci = x.astype(self.dtype), [], 0, 0
        for op in order:
            if op == 'd':
                h = _constrain(data[di](h, emb))
                di += 1
            elif op == 'c':
                h = _constrain(context_op(ci, h))
                ci += 1
            elif op == 's':
                hs.append(h)
            else:
                h = jnp.concatenate([h, hs.pop()], axis=-1)
        return h.astype(jnp.float32)

    # -- public API --------------------------------------------------------------------------
    def __call__(self, x, t, context, xtype: str = 'image', ctype: str = 'text'):
        """Run one flow.

        Args:
          x: noisy latent; image (B, H, W, 4) channels-last, text (B, 768).
          t: timesteps (B,) or scalar, as fed to the model (the original DDIM feeds t+1).
          context: (B, L, context_dim): CLIP text (L=77) or CLIP image (L=257) tokens.
          xtype: output modality = which data layers ('image' | 'text').
          ctype: context modality = which context layers ('image' | 'text').
        Returns:
          eps prediction, same shape as x, float32.
        """
        self._check(x, xtype, [context], [ctype])
        ctx_blocks = getattr(self, ctype).context_blocks
        return self._run(x, t, xtype, lambda j, h: ctx_blocks[j](h, context))

    def mix(self, x, t, contexts: Sequence, ctypes: Sequence[str], ratios,
            xtype: str = 'image', mixing: str = 'attention', layer_choices=None, rng=None):
        """Run with several contexts mixed at every context layer (`apply_model_multicontext`).

        mixing='attention': h = sum_i r_i * layer_i(h, c_i), r = ratios / sum(ratios);
          ratios (n,) for the batch or (B, n) per sample.
        mixing='layer': each context layer runs one context, chosen by `layer_choices`
          (static Python/numpy ints, one per context layer: only the chosen layer runs; or a
          traced array (n_ctx,) / (B, n_ctx)) or drawn with probabilities r from `rng` (same
          draw for the whole batch, as the original).
        Works for every xtype, unlike the original (which crashes for text output).
        """
        if mixing not in ('attention', 'layer'):
            raise ValueError(f"mixing must be 'attention' or 'layer', got {mixing!r}")
        contexts, ctypes = list(contexts), tuple(ctypes)
        if not contexts or len(contexts) != len(ctypes):
            raise ValueError(f'need one ctype per context: {len(contexts)} contexts, {len(ctypes)} ctypes')
        self._check(x, xtype, contexts, ctypes)
        n, b = len(contexts), x.shape[0]
        ratios = jnp.asarray(ratios, jnp.float32)
        if ratios.shape not in ((n,), (b, n)):
            raise ValueError(f'ratios must have shape ({n},) or (B={b}, {n}), got {ratios.shape}')
        r = ratios / ratios.sum(-1, keepdims=True)
        banks = [getattr(self, ct).context_blocks for ct in ctypes]
        n_ctx = len(plan_stream(self.config.stream(xtype)).context)

        def weight(w):  # a scalar, or one weight per sample broadcast over (B, H, W, C)
            return w.astype(self.dtype) if w.ndim == 0 else w.reshape(b, 1, 1, 1).astype(self.dtype)

        if mixing == 'attention':
            def op(j, h):
                return sum(weight(r[..., i]) * banks[i][j](h, contexts[i]) for i in range(n))
            return self._run(x, t, xtype, op)

        if layer_choices is None:
            if rng is None:
                raise ValueError("mixing='layer' needs layer_choices or an rng key")
            if r.ndim != 1:
                raise ValueError('per-sample ratios with an rng key: draw the choices yourself '
                                 '(layer_choices of shape (B, n_context_layers))')
            layer_choices = jax.random.choice(rng, n, shape=(n_ctx,), p=r)
        if isinstance(layer_choices, (list, tuple, np.ndarray)):
            choices = [int(c) for c in np.asarray(layer_choices).reshape(-1)]
            if len(choices) != n_ctx or not all(0 <= c < n for c in choices):
                raise ValueError(f'layer_choices must be {n_ctx} ints in [0, {n}), got {choices}')
            return self._run(x, t, xtype, lambda j, h: banks[choices[j]][j](h, contexts[choices[j]]))
        layer_choices = jnp.asarray(layer_choices)
        if layer_choices.shape not in ((n_ctx,), (b, n_ctx)):
            raise ValueError(f'layer_choices must have shape ({n_ctx},) or (B={b}, {n_ctx}), '
                             f'got {layer_choices.shape}')
        onehot = jax.nn.one_hot(layer_choices, n, dtype=self.dtype)  # (..., n_ctx, n)

        def op(j, h):  # traced choices: run every context, keep the chosen one exactly
            return sum(weight(onehot[..., j, i]) * banks[i][j](h, contexts[i]) for i in range(n))
        return self._run(x, t, xtype, op)

    def init_all(self, batch: int = 1):
        """Touch every parameter (for `init`/`eval_shape`): one flow per data stream, and one
        per context stream not yet covered."""
        cfg = self.config
        data, ctx = cfg.with_part('data'), cfg.with_part('context')
        if not data or not ctx:
            raise ValueError('a diffuser needs at least one stream with data layers and one '
                             'with context layers')
        flows = [(d, ctx[0]) for d in data] + [(data[0], c) for c in ctx[1:]]
        out = []
        for xt, ct in flows:
            out.append(self(example_latent(cfg.stream(xt), batch), jnp.zeros((batch,)),
                            jnp.zeros((batch, 1, cfg.stream(ct).context_dim)), xt, ct))
        return out


def example_latent(s: StreamConfig, batch: int = 1, size: Optional[int] = None):
    """A zero latent of the right shape for a stream (image: smallest legal size)."""
    if s.kind == '2d':
        size = size or 2 ** (len(s.channel_mult) - 1)
        return jnp.zeros((batch, size, size, s.in_channels))
    return jnp.zeros((batch, s.in_channels))


def example_inputs(config: DiffuserConfig, batch: int = 1):
    """(x, t, context, xtype, ctype) for `Diffuser.__call__`: the first data stream's flow
    with the first context stream, smallest legal latent, a one-token context."""
    data, ctx = config.with_part('data'), config.with_part('context')
    return (example_latent(config.stream(data[0]), batch), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, config.stream(ctx[0]).context_dim)), data[0], ctx[0])
