"""Primitives shared by every vd_jax model family.

Everything here is channels-last. Dense/Conv carry logical axis names on their
parameters (`vd_jax.sharding_names`) so the sharding resolver can place them, and
initialise like PyTorch's `nn.Linear`/`nn.Conv2d` (uniform in ±1/sqrt(fan_in) for
weight and bias) so that training from scratch starts where the original would.
Norms take their epsilon explicitly: PyTorch and Flax defaults differ (1e-5 vs 1e-6)
and the original mixes both.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding_names as ax

Dtype = Any


def _fan_in_uniform(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for weights and biases."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _partitioned(init, names):
    return nn.with_logical_partitioning(init, names) if names is not None else init


class Dense(nn.Module):
    """`nn.Linear` with kernel (in, out); `zero_init` mirrors the original's `zero_module`."""
    features: int
    use_bias: bool = True
    zero_init: bool = False
    kernel_axes: Optional[Sequence[Optional[str]]] = (ax.EMBED, ax.MLP)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = nn.initializers.zeros if self.zero_init else _fan_in_uniform(fan_in)
        kernel = self.param('kernel', _partitioned(init, self.kernel_axes),
                            (fan_in, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            binit = nn.initializers.zeros if self.zero_init else _fan_in_uniform(fan_in)
            bias_axes = None if self.kernel_axes is None else (self.kernel_axes[-1],)
            bias = self.param('bias', _partitioned(binit, bias_axes), (self.features,),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """2-D convolution, NHWC input, HWIO kernel; symmetric integer padding as in PyTorch."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    zero_init: bool = False
    kernel_axes: Optional[Sequence[Optional[str]]] = (None, None, ax.CONV_IN, ax.CONV_OUT)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        cin = x.shape[-1]
        fan_in = cin * k * k
        init = nn.initializers.zeros if self.zero_init else _fan_in_uniform(fan_in)
        kernel = self.param('kernel', _partitioned(init, self.kernel_axes),
                            (k, k, cin, self.features), self.param_dtype)
        bias_axes = None if self.kernel_axes is None else (self.kernel_axes[-1],)
        bias = self.param('bias', _partitioned(init, bias_axes), (self.features,),
                          self.param_dtype)
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return y + bias.astype(self.dtype)


def group_norm_stats(x, num_groups: int):
    """Group statistics of x (B, ..., C): groups of C/num_groups channels, all middle axes.

    Computed in float32 whatever the compute dtype; the variance is the biased
    E[(x - mean)^2], as in `torch.nn.GroupNorm`. Returns (x as (B, N, G, C/G) float32,
    mean, var), so callers choose their own affine.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f'GroupNorm: {c} channels are not divisible into {num_groups} groups')
    n = int(np.prod(x.shape[1:-1]))  # explicit: -1 is ambiguous for a zero-size batch
    xf = x.astype(jnp.float32).reshape(b, n, num_groups, c // num_groups)
    mean = xf.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
    return xf, mean, var


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm` on channels-last input with a per-channel affine."""
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf, mean, var = group_norm_stats(x, self.num_groups)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        scale = self.param('scale', _partitioned(nn.initializers.ones, (ax.NORM,)), (c,),
                           self.param_dtype)
        bias = self.param('bias', _partitioned(nn.initializers.zeros, (ax.NORM,)), (c,),
                          self.param_dtype)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the last axis; statistics in float32."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param('scale', _partitioned(nn.initializers.ones, (ax.NORM,)), (c,),
                           self.param_dtype)
        bias = self.param('bias', _partitioned(nn.initializers.zeros, (ax.NORM,)), (c,),
                          self.param_dtype)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), float32, **cos first**.

    The original (`diffusion_utils.timestep_embedding`) puts cos before sin, unlike
    diffusers' default `flip_sin_to_cos=False` ordering; the time MLP weights depend on it.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def attention(q, k, v, num_heads: int, bias=None, scale: Optional[float] = None,
              dtype: Dtype = jnp.float32):
    """Multi-head scaled dot-product attention on packed heads.

    q: (B, Lq, H*D), k/v: (B, Lk, H*D); bias broadcastable to (B, H, Lq, Lk) is added
    to the logits (use a large negative number for masked positions). The softmax runs
    in float32. Returns (B, Lq, H*D).
    """
    b, lq, inner = q.shape
    d = inner // num_heads
    scale = d ** -0.5 if scale is None else scale
    q = q.reshape(b, lq, num_heads, d)
    k = k.reshape(b, k.shape[1], num_heads, d)
    v = v.reshape(b, v.shape[1], num_heads, d)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)  # (B, Lq, H, D)
    return out.reshape(b, lq, inner)
