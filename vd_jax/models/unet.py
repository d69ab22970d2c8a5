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
lives at `image/data_blocks_3/op/kernel`. The stream arguments and the layer plan are parsed
in `vd_jax.models.diffuser_config`; the context layers are `vd_jax.models.attention`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.attention import SpatialTransformer, repeat_groups
from vd_jax.models.diffuser_config import BlockSpec, DiffuserConfig, StreamConfig, plan_stream
from vd_jax.models.layers import (Conv, Dense, GroupNorm, Upsample, group_norm_stats,
                                  timestep_embedding)

Dtype = Any


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
    def _check(self, x, xtype: str, contexts, ctypes, shared_x: bool = False):
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
            rows_ok = c.ndim == 3 and (c.shape[0] == x.shape[0] or (
                shared_x and c.shape[0] > 0 and c.shape[0] % x.shape[0] == 0))
            if not rows_ok or c.shape[-1] != cd:
                rows = f'a multiple of B={x.shape[0]}' if shared_x else f'B={x.shape[0]}'
                raise ValueError(f"context for '{ct}' must be ({rows}, L, {cd}), got {c.shape}")

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
                rows = h.shape[0]
                h = _constrain(context_op(ci, h))
                ci += 1
                if h.shape[0] != rows:  # x shared by context groups: from here on, per group
                    groups = h.shape[0] // rows
                    emb = repeat_groups(emb, groups)
                    hs = [repeat_groups(a, groups) for a in hs]
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
          context: (B, L, context_dim): CLIP text (L=77) or CLIP image (L=257) tokens; or
            (G*B, L, context_dim): G context groups (group-major) sharing x and t, as the
            unconditional and conditional halves of classifier-free guidance do. Everything
            up to the first self-attention then runs once for the B rows (the same values as
            with x repeated G times, up to float32 summation order).
          xtype: output modality = which data layers ('image' | 'text').
          ctype: context modality = which context layers ('image' | 'text').
        Returns:
          eps prediction, float32, shaped as x (with G*B rows for G context groups).
        """
        self._check(x, xtype, [context], [ctype], shared_x=True)
        ctx_blocks = getattr(self, ctype).context_blocks
        out = self._run(x, t, xtype, lambda j, h: ctx_blocks[j](h, context))
        return repeat_groups(out, context.shape[0] // out.shape[0])

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
