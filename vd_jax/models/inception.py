"""The InceptionV3 of the standard FID: pool3 features (2048-d) of the 2015-12-05 TF graph.

This is the network of TTUR's original TensorFlow FID as pytorch-fid (`InceptionV3`,
`fid_inception_v3`) and torch-fidelity (`FeatureExtractorInceptionV3`) port it, so that
published FID numbers and precomputed reference statistics stay comparable. It differs from
torchvision's ImageNet InceptionV3 (which gives different FIDs):
  * the average pools inside the A, C and first E blocks do not count the zero padding
    (TF's `avg_pool`, PyTorch `count_include_pad=False`);
  * the pool branch of the last block (`Mixed_7c`, "E_2") is a 3x3 max pool, not an average;
  * BatchNorm epsilon 1e-3, no conv biases, 1008 classes in the (unused) `fc`.

Input handling is pytorch-fid's: images (B, H, W, 3) in [0, 1] are resized to 299 x 299 with
`F.interpolate(mode='bilinear', align_corners=False)` semantics (no antialiasing), then
scaled to [-1, 1] by 2x - 1; `resize_input` / `normalize_input` switch the two steps off as
pytorch-fid's arguments of the same names do. Output: the global average pool of `Mixed_7c`,
(B, 2048).

Channels-last throughout. Parameter paths mirror the state-dict names of the released
`pt_inception-2015-12-05-6726825d.pth`: `Mixed_6b.branch7x7_2.conv.weight` lives at
`Mixed_6b/branch7x7_2/conv/kernel` (HWIO), `Mixed_6b.branch7x7_2.bn.{weight,bias,running_mean,
running_var}` at `.../bn/{scale,bias,running_mean,running_var}`. BatchNorm is kept in inference
form with its running statistics stored as parameters (this network is never trained here).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax.models import init
from vd_jax.models.common import config_from_dict

Dtype = Any

# The input side of the TF graph ("Mul:0" takes 299 x 299 images).
FID_INPUT_SIZE = 299
# Width of the pool3 features.
FEATURE_DIM = 2048
# BasicConv2d's BatchNorm2d(eps=0.001): TF's batch_norm epsilon in the 2015 graph.
BN_EPS = 1e-3
# Smallest input the trunk accepts without `resize_input` (three stride-2 stages + VALID convs
# must leave at least one pixel before Mixed_7a's stride-2 3x3 convs).
MIN_INPUT_SIZE = 75


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Input handling of the FID InceptionV3 (pytorch-fid's `InceptionV3` arguments).

    resize_input: bilinearly resize every input to 299 x 299 (align_corners=False).
    normalize_input: map [0, 1] to [-1, 1] (2x - 1) after the resize.
    """
    resize_input: bool = True
    normalize_input: bool = True

    @classmethod
    def from_dict(cls, d) -> 'InceptionConfig':
        """From a dict (or ConfigDict) of the two switches; unknown keys are an error."""
        return config_from_dict(cls, d, 'FID Inception config')


# ----------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------

def _bilinear_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: (i0, i1, w0, w1) of PyTorch's bilinear, align_corners=False.

    As ATen's `area_pixel_compute_source_index` and `UpSampleKernel.cpp`, in float32:
    scale = in / out, src = scale * (dst + 0.5) - 0.5 clamped at 0, i0 = floor(src),
    i1 = i0 + 1 unless at the last pixel, w1 = src - i0, w0 = 1 - w1. PyTorch's CPU build
    contracts `scale * x - 0.5` into one fused multiply-add (one rounding); emulating that
    (exact product in float64, one rounding to float32) matters: two roundings move `src` by
    up to ~1e-7 * dst, i.e. the resized pixels by up to ~1e-4 at 5000-pixel inputs.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    # float32 x float32 is exact in float64: the only rounding is the final one, as in an FMA
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)  # truncation == floor: src >= 0
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return i0, i1, w0, w1


def resize_bilinear(x: jnp.ndarray, size: Tuple[int, int] = (FID_INPUT_SIZE, FID_INPUT_SIZE)
                    ) -> jnp.ndarray:
    """`F.interpolate(x, size, mode='bilinear', align_corners=False)` of (B, H, W, C) images.

    No antialiasing when shrinking (PyTorch's default, which pytorch-fid uses). The taps are
    computed on the host from the static shapes; the width pass runs first and the height
    pass combines its rows, the order of PyTorch's CPU kernel.
    """
    h_out, w_out = size
    b, h, w, c = x.shape
    if (h, w) == (h_out, w_out):
        return x  # scale 1: every source index is exact and its weight is (1, 0)
    y0, y1, hy0, hy1 = _bilinear_taps(h, h_out)
    x0, x1, wx0, wx1 = _bilinear_taps(w, w_out)
    cols = (jnp.take(x, x0, axis=2) * wx0[None, None, :, None]
            + jnp.take(x, x1, axis=2) * wx1[None, None, :, None])
    return (jnp.take(cols, y0, axis=1) * hy0[None, :, None, None]
            + jnp.take(cols, y1, axis=1) * hy1[None, :, None, None])


def preprocess(images: jnp.ndarray, config: InceptionConfig = InceptionConfig()) -> jnp.ndarray:
    """pytorch-fid's input handling of float images (B, H, W, 3) in [0, 1], in float32 (or
    float64 for float64 input): resize to 299 x 299 (`resize_bilinear`), then 2x - 1."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'InceptionV3: images must be (B, H, W, 3) channels-last, got shape '
                         f'{tuple(images.shape)}')
    x = images.astype(jnp.promote_types(images.dtype, jnp.float32))
    if config.resize_input:
        x = resize_bilinear(x, (FID_INPUT_SIZE, FID_INPUT_SIZE))
    elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
        raise ValueError(f'InceptionV3 without resize_input needs inputs of at least '
                         f'{MIN_INPUT_SIZE} x {MIN_INPUT_SIZE}, got {tuple(x.shape[1:3])}')
    if config.normalize_input:
        x = 2 * x - 1
    return x


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------

class BatchNorm(nn.Module):
    """Inference-mode `nn.BatchNorm2d`: (x - running_mean) / sqrt(running_var + eps) * scale + bias.

    Computed as PyTorch's CPU kernel does: alpha = scale / sqrt(var + eps), x * alpha +
    (bias - mean * alpha). Leaves: scale, bias, running_mean, running_var (all 'params').
    """
    epsilon: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param('running_mean', nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param('running_var', nn.initializers.ones, (c,), self.param_dtype)
        acc = jnp.promote_types(self.dtype, jnp.float32)  # coefficients in >= float32
        alpha = scale.astype(acc) / jnp.sqrt(var.astype(acc) + self.epsilon)
        beta = bias.astype(acc) - mean.astype(acc) * alpha
        return x * alpha.astype(self.dtype) + beta.astype(self.dtype)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, with PyTorch's symmetric padding."""
    features: int
    kernel_size: Any = 1          # int or (kh, kw)
    stride: int = 1
    padding: Any = 0              # int or (ph, pw)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def setup(self):
        ph, pw = _pair(self.padding)
        self.conv = nn.Conv(self.features, _pair(self.kernel_size), strides=self.stride,
                            padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, precision=self.precision)
        self.bn = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x):
    # TF's avg_pool with SAME padding averages only the real pixels (count_include_pad=False)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, features, kernel_size, stride=1, padding=0, name=None):
        return BasicConv2d(features, kernel_size, stride, padding, dtype=self.dtype,
                           param_dtype=self.param_dtype, precision=self.precision, name=name)


class FIDInceptionA(_Block):
    """35 x 35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1 -> 224 + pool_features."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, 1, name='branch1x1')(x)
        b5 = self.conv(48, 1, name='branch5x5_1')(x)
        b5 = self.conv(64, 5, padding=2, name='branch5x5_2')(b5)
        b3 = self.conv(64, 1, name='branch3x3dbl_1')(x)
        b3 = self.conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
        b3 = self.conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
        bp = self.conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (`Mixed_6a`): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + C."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, 3, stride=2, name='branch3x3')(x)
        bd = self.conv(64, 1, name='branch3x3dbl_1')(x)
        bd = self.conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
        bd = self.conv(96, 3, stride=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
    """17 x 17 block with factorised 7x7 convolutions -> 768."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv(192, 1, name='branch1x1')(x)
        b7 = self.conv(c7, 1, name='branch7x7_1')(x)
        b7 = self.conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
        b7 = self.conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
        bd = self.conv(c7, 1, name='branch7x7dbl_1')(x)
        bd = self.conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
        bd = self.conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
        bd = self.conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
        bd = self.conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
        bp = self.conv(192, 1, name='branch_pool')(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction (`Mixed_7a`): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + C."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(192, 1, name='branch3x3_1')(x)
        b3 = self.conv(320, 3, stride=2, name='branch3x3_2')(b3)
        b7 = self.conv(192, 1, name='branch7x7x3_1')(x)
        b7 = self.conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = self.conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = self.conv(192, 3, stride=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(_Block):
    """8 x 8 block with split 1x3/3x1 outputs -> 2048. `pool='avg'` is FIDInceptionE_1
    (`Mixed_7b`), `pool='max'` FIDInceptionE_2 (`Mixed_7c`, the TF graph's max pool)."""
    pool: str = 'avg'

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(320, 1, name='branch1x1')(x)
        b3 = self.conv(384, 1, name='branch3x3_1')(x)
        b3 = jnp.concatenate([self.conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                              self.conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)],
                             axis=-1)
        bd = self.conv(448, 1, name='branch3x3dbl_1')(x)
        bd = self.conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([self.conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                              self.conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)],
                             axis=-1)
        pooled = _avg_pool_3x3_same(x) if self.pool == 'avg' else _max_pool_3x3_same(x)
        bp = self.conv(192, 1, name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------

class InceptionV3(nn.Module):
    """FID InceptionV3 up to pool3: images (B, H, W, 3) -> features (B, 2048).

    `precision` applies to every convolution: HIGHEST keeps float32 accumulation on TPU/GPU
    (their default bf16/TF32 passes move FID values); it changes nothing on CPU.
    """
    config: InceptionConfig = InceptionConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.Conv2d_1a_3x3 = BasicConv2d(32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(pool_features=32, **kw)
        self.Mixed_5c = FIDInceptionA(pool_features=64, **kw)
        self.Mixed_5d = FIDInceptionA(pool_features=64, **kw)
        self.Mixed_6a = InceptionB(**kw)
        self.Mixed_6b = FIDInceptionC(channels_7x7=128, **kw)
        self.Mixed_6c = FIDInceptionC(channels_7x7=160, **kw)
        self.Mixed_6d = FIDInceptionC(channels_7x7=160, **kw)
        self.Mixed_6e = FIDInceptionC(channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(**kw)
        self.Mixed_7b = FIDInceptionE(pool='avg', **kw)
        self.Mixed_7c = FIDInceptionE(pool='max', **kw)

    def __call__(self, images):
        """images (B, H, W, 3) float, in [0, 1] (or already in [-1, 1] without
        `normalize_input`) -> pool3 features (B, 2048) float32 (float64 if dtype is)."""
        x = preprocess(images, self.config).astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        # AdaptiveAvgPool2d((1, 1)) + flatten, accumulated in (at least) float32
        return jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))

    def init_all(self, batch: int = 1):
        """Touch every parameter (the model-family interface, `vd_jax.models.FAMILIES`)."""
        return self(*example_inputs(self.config, batch))


def example_inputs(config: InceptionConfig, batch: int = 1):
    """(images (B, 299, 299, 3) zeros,) for `InceptionV3.__call__`: the nominal input."""
    del config  # every config takes the same input
    return (jnp.zeros((batch, FID_INPUT_SIZE, FID_INPUT_SIZE, 3), jnp.float32),)


def abstract_params(model: Optional[InceptionV3] = None):
    """Parameter shapes (ShapeDtypeStructs) of the FID InceptionV3 (default config), through
    the one `vd_jax.models.init.abstract_params`."""
    return init.abstract_params(model or InceptionV3())
