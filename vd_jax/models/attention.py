"""The SD-v1 cross-attention transformer that forms VD's context layers (SHI-Labs
`lib/model_zoo/attention.py`: CrossAttention, GEGLU, FeedForward, BasicTransformerBlock,
SpatialTransformer, depth 1). Channels-last: image hidden states (B, H, W, C), text hidden
states (B, S, 1, C); the context is (B, L, context_dim).

`attention` is looked up in this module's globals at call time, so a benchmark can swap the
attention function of the diffuser alone (`benchmarks/bench_levers.py`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from vd_jax.models.layers import Dense, GroupNorm, LayerNorm, attention

Dtype = Any


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
        # context rows = G x the rows of x: x is shared by G context groups (the CFG halves).
        # Self-attention is the last operation that cannot tell the groups apart.
        x = repeat_groups(x, context.shape[0] // x.shape[0])
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


def repeat_groups(x, groups: int):
    """(B, ...) -> (groups * B, ...): x repeated group-major, [x; x; ...] (groups >= 1)."""
    return x if groups == 1 else jnp.concatenate([x] * groups, axis=0)


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

    def __call__(self, x, context):
        """x (B, H, W, C) or (B, S, 1, C); context (G*B, L, D), G >= 1: with G > 1, x is
        shared by G context groups (group-major) and the result has G*B rows, computed
        once up to the self-attention (`BasicTransformerBlock`)."""
        b, hh, ww, c = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(b, hh * ww, h.shape[-1])
        for blk in self.transformer_blocks:
            h = blk(h, context.astype(self.dtype))
        h = self.proj_out(h).reshape(h.shape[0], hh, ww, c)
        return h + repeat_groups(x, h.shape[0] // b)
