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


class Upsample(nn.Module):
    """Nearest-neighbour x2 (`F.interpolate(mode='nearest')`) then a 3x3 conv (key `conv`):
    the same layer in the diffuser's image stream and in AutoKL's decoder.
    (B, H, W, C) -> (B, 2H, 2W, channels); `emb` is accepted (and unused) so the diffuser can
    call every data block alike."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv(self.channels, 3, 1, 1, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, emb=None):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


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


# Attention runs head-major on CPU: q/k/v are transposed once to (B, H, L, D), so every logits and
# output product is a plain batched matmul over (B, H). Contracting the packed (B, L, H, D)
# layout directly made XLA:CPU's batched dots 2.3x slower at 1024 tokens (BENCHMARKS.md §6).
#
# Above this many keys, the CPU path switches to the blockwise (online-softmax) form: it never
# materialises the (B, H, Lq, Lk) logits. On this CPU it is faster from 1024 keys on (32x32
# and 64x64 latents) and cut the 64x64 sampler's peak memory from 7.5 to 4.6 GiB.
BLOCKWISE_MIN_KEYS = 512
# With the fixed 'bound' shift the key blocks need no rescaling, and one key block of up to
# 4096 keys (the 64x64 latents' self-attention: no scan over keys) made the image stream's
# 64x64 CFG step 4-8% faster than 512-key blocks (benchmarks/attention_share.py, Zen 4,
# BENCHMARKS.md 3c); 256 queries per block was the best of 128-1024. A (B, H, 256, 4096)
# float32 logits block is 64 MB at batch 2 and 8 heads.
Q_BLOCK, K_BLOCK = 256, 4096
IMPLEMENTATIONS = ('auto', 'dense', 'blockwise', 'fused')
# blockwise_attention's exponent shift; with 'bound', a query block falls back to the running
# max when some row's sum of exp(logit - bound) is below BOUND_MIN_SUM. Above it, the row's
# largest term is >= 1e-26 / keys (a normal float32 below 1e11 keys) and each term XLA:CPU
# flushes to zero (< 1.2e-38) is below 1.2e-12 of the sum: float32 precision is kept.
SHIFTS = ('running', 'bound')
BOUND_MIN_SUM = 1e-26
# Backends on which 'auto' attention is `jax.nn.dot_product_attention` ('fused'). The CPU
# tuning above (head-major transposes, the blockwise scan) was measured on XLA:CPU only; on
# GPU/TPU the one fused call leaves the choice to JAX/XLA (and `fused_implementation='cudnn'`
# reaches cuDNN's flash kernel). Not measured on this project's CPU-only machine.
FUSED_BACKENDS = ('gpu', 'cuda', 'rocm', 'tpu')


def fused_by_default() -> bool:
    """Whether 'auto' attention takes the fused path: the default JAX backend is a GPU/TPU."""
    return jax.default_backend() in FUSED_BACKENDS


def _split_heads(x, num_heads: int):
    """(B, L, H*D) -> (B, H, L, D)."""
    b, n, inner = x.shape
    return x.reshape(b, n, num_heads, inner // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B, H, L, D) -> (B, L, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def attention(q, k, v, num_heads: int, bias=None, scale: Optional[float] = None,
              dtype: Dtype = jnp.float32, implementation: str = 'auto',
              fused_implementation: Optional[str] = None):
    """Multi-head scaled dot-product attention on packed heads.

    q: (B, Lq, H*D), k/v: (B, Lk, H*D); bias broadcastable to (B, H, Lq, Lk) is added
    to the logits (use a large negative number for masked positions). The softmax runs
    in float32. Returns (B, Lq, H*D) in `dtype`.

    implementation:
      'auto': 'fused' on GPU/TPU backends (`fused_by_default`); on CPU 'blockwise' when
        there is no bias and more than `BLOCKWISE_MIN_KEYS` keys, else 'dense';
      'dense': head-major batched matmuls (tuned for XLA:CPU);
      'blockwise': online softmax over key blocks (no bias; bounded memory);
      'fused': `jax.nn.dot_product_attention` on the packed (B, L, H, D) view, with
        `fused_implementation` (None lets JAX choose, which in jax 0.10.2 is its XLA
        formulation; 'xla'; or 'cudnn' for cuDNN's flash attention on NVIDIA GPUs, which
        takes fp16/bf16 inputs and raises on shapes it does not support).
    All give the same values up to summation order.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'attention implementation must be one of {IMPLEMENTATIONS}, '
                         f'got {implementation!r}')
    d = q.shape[-1] // num_heads
    scale = d ** -0.5 if scale is None else scale
    if implementation == 'fused' or (implementation == 'auto' and fused_by_default()):
        return fused_attention(q, k, v, num_heads, bias, scale, dtype, fused_implementation)
    if implementation == 'blockwise' or (implementation == 'auto' and bias is None
                                         and k.shape[1] > BLOCKWISE_MIN_KEYS):
        if bias is not None:
            raise ValueError('blockwise attention does not take a bias')
        return blockwise_attention(q, k, v, num_heads, scale, dtype)
    # scale q, not the logits, and normalise after the value product: both save a pass over
    # the (B, H, Lq, Lk) logits, which XLA:CPU does not fuse into the dots (1.6x at 1024 keys)
    qh, kh, vh = (_split_heads(x, num_heads) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    logits = jnp.einsum('bhqd,bhkd->bhqk', qh, kh).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum('bhqk,bhkd->bhqd', p.astype(dtype), vh) / p.sum(-1, keepdims=True)
    return _merge_heads(out.astype(dtype))


def fused_attention(q, k, v, num_heads: int, bias=None, scale: Optional[float] = None,
                    dtype: Dtype = jnp.float32, implementation: Optional[str] = None):
    """`attention` through `jax.nn.dot_product_attention` (same shapes and contract).

    The packed (B, L, H*D) projections are already its (B, L, H, D) layout: a reshape, no
    transpose. q/k/v are cast to `dtype` (the compute dtype, as the other paths' products);
    logits and softmax are float32 inside it. `bias` is added to the logits as given.
    """
    b, lq, inner = q.shape
    d = inner // num_heads
    q4, k4, v4 = (x.astype(dtype).reshape(x.shape[0], x.shape[1], num_heads, d) for x in (q, k, v))
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # it wants 4-D (B, H, Lq, Lk)
    out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias, scale=scale,
                                       implementation=implementation)
    return out.reshape(b, lq, inner).astype(dtype)


def blockwise_attention(q, k, v, num_heads: int, scale: float, dtype: Dtype = jnp.float32,
                        q_block: int = Q_BLOCK, k_block: int = K_BLOCK, shift: str = 'bound'):
    """Exact softmax attention computed block by block (FlashAttention's online softmax).

    Queries are processed `q_block` at a time (`lax.map`), keys `k_block` at a time
    (`lax.scan` carrying the running max, denominator and output), so no logits block larger
    than (B, H, q_block, k_block) exists. Lengths need not divide the blocks: padding keys
    are masked out, padding queries dropped. The key step is rematerialised in the backward
    pass, so training does not store the probabilities either. Same shapes as `attention`.

    shift: what the exponent subtracts. 'running': the running row max (FlashAttention);
    'bound': a fixed per-row upper bound of the logits, |q_i| max_j |k_j| (one pass less over
    every logits block, no rescaling), with the running max as the fallback of any query block
    whose bound is too loose for float32 (see the code).
    """
    if shift not in SHIFTS:
        raise ValueError(f'blockwise attention shift must be one of {SHIFTS}, got {shift!r}')
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // num_heads
    q_block, k_block = min(q_block, lq), min(k_block, lk)
    nq, nk = -(-lq // q_block), -(-lk // k_block)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0)))
    # (nq, B, H, q_block, D); keys pre-transposed (nk, B, H, D, k_block); values (nk, B, H, k_block, D)
    qs = jnp.moveaxis(_split_heads(pad(q * jnp.asarray(scale, q.dtype), nq * q_block), num_heads)
                      .reshape(b, num_heads, nq, q_block, d), 2, 0)
    ks = jnp.moveaxis(_split_heads(pad(k, nk * k_block), num_heads).swapaxes(2, 3)
                      .reshape(b, num_heads, d, nk, k_block), 3, 0)
    vs = jnp.moveaxis(_split_heads(pad(v, nk * k_block), num_heads)
                      .reshape(b, num_heads, nk, k_block, d), 2, 0)
    valid = (jnp.arange(nk * k_block) < lk).reshape(nk, k_block)
    ragged = lk % k_block != 0   # padding keys to mask: a select pass over every logits block

    @jax.checkpoint
    def key_step(carry, block):
        m, l, acc, qi = carry
        kj, vj, ok = block
        s = jnp.matmul(qi, kj).astype(jnp.float32)  # (B, H, q_block, k_block); q pre-scaled
        if ragged:  # (static) the first key block always has a real key
            s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1, keepdims=True)
        acc = acc * corr + jnp.matmul(p.astype(dtype), vj).astype(jnp.float32)
        return (m_new, l, acc, qi), None

    def query_block(qi):
        init = (jnp.full((b, num_heads, q_block, 1), -jnp.inf, jnp.float32),
                jnp.zeros((b, num_heads, q_block, 1), jnp.float32),
                jnp.zeros((b, num_heads, q_block, d), jnp.float32), qi)
        (m, l, acc, _), _ = jax.lax.scan(key_step, init, (ks, vs, valid))
        return acc / l  # (B, H, q_block, D)

    if shift == 'running':
        out = jax.lax.map(query_block, qs)  # (nq, B, H, q_block, D)
    else:
        # Cauchy-Schwarz: q_i . k_j <= |q_i| max_j |k_j| =: m_i for every key, so exp(s - m_i)
        # never overflows and m_i is the same for every key block: no max pass over the logits
        # and no rescaling of the running sums. The softmax does not depend on the shift
        # (stop_gradient is exact). A loose bound underflows: a query block in which some row's
        # sum falls below BOUND_MIN_SUM is recomputed with the running max (lax.cond runs one
        # branch), so the result is the softmax's either way.
        # (B, H); padding keys are zeros, so they cannot raise the max
        k_max = jnp.sqrt(jnp.square(ks.astype(jnp.float32)).sum(-2)).max((0, -1))
        bounds = jax.lax.stop_gradient(
            jnp.sqrt(jnp.square(qs.astype(jnp.float32)).sum(-1, keepdims=True))
            * k_max[:, :, None, None])                                     # (nq, B, H, qb, 1)

        @jax.checkpoint
        def fixed_step(carry, block):
            l, acc, qi, mi = carry
            kj, vj, ok = block
            p = jnp.exp(jnp.matmul(qi, kj).astype(jnp.float32) - mi)
            if ragged:
                p = jnp.where(ok, p, 0.0)
            return (l + p.sum(-1, keepdims=True),
                    acc + jnp.matmul(p.astype(dtype), vj).astype(jnp.float32), qi, mi), None

        def bounded_block(args):
            qi, mi = args
            init = (jnp.zeros((b, num_heads, q_block, 1), jnp.float32),
                    jnp.zeros((b, num_heads, q_block, d), jnp.float32), qi, mi)
            (l, acc, _, _), _ = jax.lax.scan(fixed_step, init, (ks, vs, valid))
            return jax.lax.cond(l.min() >= BOUND_MIN_SUM, lambda: acc / l,
                                lambda: query_block(qi))

        out = jax.lax.map(bounded_block, (qs, bounds))
    out = jnp.moveaxis(out, 0, 2).reshape(b, num_heads, nq * q_block, d)[:, :, :lq]
    return _merge_heads(out).astype(dtype)
