"""The image VAE of Versatile Diffusion: the Stable Diffusion kl-f8 `AutoencoderKL`
(SHI-Labs `lib/model_zoo/autokl.py`, `autokl_modules.py`, `distributions.py`; the
LDM/taming code it copies).

Two layers of API:
  * the network, `AutoencoderKL.encode(x) -> (mean, logvar)` and `decode(z)`, on images
    in [-1, 1] and *unscaled* latents, exactly as LDM and diffusers compute them (this is
    what the parity tests compare);
  * VD's conventions, in one place (`encode_images` / `decode_latents`, and the functional
    `vae_encode` / `vae_decode`): images are floats in [0, 1], channels-last; encoding
    maps them to [-1, 1], draws a posterior **sample** (`autokl.py:encode` returns
    `posterior.sample()`, not the mean) from an explicit PRNG key, and multiplies by the
    latent scale 0.18215 (`vd.py:vae_encode`); decoding divides by it and returns
    `clip((dec + 1) / 2, 0, 1)`.

Everything is channels-last: images (B, H, W, 3), latents (B, H/8, W/8, 4). Parameter
paths mirror the LDM state dict: `encoder.down.0.block.1.norm1.weight` lives at
`encoder/down_0/block_1/norm1/scale`, `decoder.mid.attn_1.q.weight` at
`decoder/mid/attn_1/q/kernel` (1x1 convolutions are `Dense` kernels (in, out)).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.layers import Conv, Dense, GroupNorm, Upsample, attention

Dtype = Any

# vd.yaml `latent_scale_factor: {image: 0.18215}`: SD's factor that brings kl-f8 latents to
# roughly unit variance, which the diffuser was trained on.
LATENT_SCALE = 0.18215
# `Normalize()` of autokl_modules.py: 32 groups, eps 1e-6 (not PyTorch's 1e-5 default).
NUM_GROUPS = 32
NORM_EPS = 1e-6
# `DiagonalGaussianDistribution` clamps the log-variance to this range (distributions.py).
LOGVAR_RANGE = (-30.0, 20.0)

# 1x1 convolutions are stored as Dense kernels (in, out); give them conv axis names so
# the sharding rules treat them like the 3x3 ones.
_CONV1X1_AXES = (ax.CONV_IN, ax.CONV_OUT)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

# Arguments of `AutoencoderKL(ddconfig, lossconfig, embed_dim)` and of `Encoder`/`Decoder`
# that we accept; the others must keep the value the released model uses.
_FIXED = {'resamp_with_conv': True, 'attn_type': 'vanilla', 'use_linear_attn': False,
          'give_pre_end': False, 'tanh_out': False, 'lossconfig': None, 'dropout': 0.0,
          'double_z': True}


@dataclasses.dataclass(frozen=True)
class AutoKLConfig:
    """`autokl_v1` (configs/model/autokl.yaml): `embed_dim` plus the `ddconfig` arguments."""
    embed_dim: int = 4                     # latent channels after quant_conv
    z_channels: int = 4                    # encoder output (x2: mean and logvar) / decoder input
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128                          # width of level 0
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                # per encoder level (the decoder has one more)
    attn_resolutions: Tuple[int, ...] = ()  # levels (by resolution) with self-attention
    resolution: int = 256                  # only used to place `attn_resolutions`
    # GroupNorm groups of every norm (`Normalize()`: 32). Not an argument of the original
    # code; small widths need fewer: with 1 channel per group (ch=32) GroupNorm is instance
    # norm, which maps a flat two-colour image to the same values whatever its colours
    # (VD-mini v1's AutoKL lost colour that way). ~4 channels per group, as 128 / 32.
    norm_groups: int = NUM_GROUPS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'AutoKLConfig':
        """From the flat config section (`configs.common.autokl`) or the original
        `{'embed_dim': .., 'ddconfig': {..}, 'lossconfig': None}` arguments."""
        if hasattr(d, 'to_dict'):
            d = d.to_dict()
        d = dict(d)
        if 'ddconfig' in d:
            d.update(dict(d.pop('ddconfig')))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - set(_FIXED))
        if unknown:
            raise ValueError(f'AutoKL config: unknown argument(s) {unknown}; allowed: '
                             f'{sorted(fields | set(_FIXED))}')
        for k, v in _FIXED.items():
            given = d.pop(k, v)
            if given != v:
                raise ValueError(f'AutoKL config: {k}={given!r} is not supported; '
                                 f'the released model uses {k}={v!r}')
        if 'ch_mult' in d:
            d['ch_mult'] = tuple(int(m) for m in d['ch_mult'])
        if 'attn_resolutions' in d:
            d['attn_resolutions'] = tuple(int(r) for r in d['attn_resolutions'])
        cfg = cls(**d)
        for w in {cfg.ch * m for m in cfg.ch_mult}:
            if w % cfg.norm_groups:
                raise ValueError(f'AutoKL config: width {w} (ch * ch_mult) is not a multiple of '
                                 f'norm_groups={cfg.norm_groups} (GroupNorm groups)')
        return cfg

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel (8 for kl-f8)."""
        return 2 ** (self.num_levels - 1)

    def level_has_attn(self, level: int) -> bool:
        """`curr_res in attn_resolutions`: level i runs at resolution // 2**i in both halves."""
        return (self.resolution // 2 ** level) in self.attn_resolutions


def as_autokl_config(config) -> AutoKLConfig:
    return config if isinstance(config, AutoKLConfig) else AutoKLConfig.from_dict(config)


# ----------------------------------------------------------------------------------------
# Blocks (autokl_modules.py)
# ----------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """`ResnetBlock` without time embedding (temb_channels=0) and without dropout."""
    in_channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    groups: int = NUM_GROUPS      # GroupNorm groups (AutoKLConfig.norm_groups)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = GroupNorm(self.groups, NORM_EPS, **kw)
        self.conv1 = Conv(self.out_channels, 3, 1, 1, **kw)
        self.norm2 = GroupNorm(self.groups, NORM_EPS, **kw)
        self.conv2 = Conv(self.out_channels, 3, 1, 1, **kw)
        if self.in_channels != self.out_channels:
            # a 1x1 conv (LDM `nin_shortcut`, diffusers `conv_shortcut`)
            self.nin_shortcut = Dense(self.out_channels, kernel_axes=_CONV1X1_AXES, **kw)

    def __call__(self, x):  # x (B, H, W, Cin) -> (B, H, W, Cout)
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """`AttnBlock`: single-head self-attention over all H*W positions, 1x1-conv q/k/v/proj."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    groups: int = NUM_GROUPS      # GroupNorm groups (AutoKLConfig.norm_groups)

    def setup(self):
        kw = dict(kernel_axes=_CONV1X1_AXES, dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = GroupNorm(self.groups, NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
        self.q = Dense(self.channels, **kw)
        self.k = Dense(self.channels, **kw)
        self.v = Dense(self.channels, **kw)
        self.proj_out = Dense(self.channels, **kw)

    def __call__(self, x):  # x (B, H, W, C)
        b, hh, ww, c = x.shape
        h = self.norm(x).reshape(b, hh * ww, c)  # (B, HW, C)
        # one head of width C: logits scaled by C**-0.5 as in the original
        h = attention(self.q(h), self.k(h), self.v(h), num_heads=1, dtype=self.dtype)
        return x + self.proj_out(h).reshape(b, hh, ww, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only right and bottom by one pixel.

    PyTorch convs pad symmetrically, so the original pads (0, 1, 0, 1) by hand and uses
    padding 0; symmetric padding 1 would shift the sampling grid by one pixel.
    """
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.conv = Conv(self.channels, 3, stride=2, padding=0, dtype=self.dtype,
                         param_dtype=self.param_dtype)

    def __call__(self, x):  # (B, H, W, C) -> (B, H//2, W//2, C)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Level(nn.Module):
    """One resolution level: `down[i]` of the encoder or `up[i]` of the decoder.

    `num_blocks` ResnetBlocks (the first changes the width), each followed by an AttnBlock
    when the level has attention, then an optional resampler.
    """
    in_channels: int
    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: Optional[str]      # 'down' | 'up' | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    groups: int = NUM_GROUPS      # GroupNorm groups (AutoKLConfig.norm_groups)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cins = [self.in_channels] + [self.out_channels] * (self.num_blocks - 1)
        g = self.groups
        self.block = [ResnetBlock(c, self.out_channels, groups=g, **kw) for c in cins]
        if self.with_attn:
            self.attn = [AttnBlock(self.out_channels, groups=g, **kw) for _ in cins]
        if self.resample == 'down':
            self.downsample = Downsample(self.out_channels, **kw)
        elif self.resample == 'up':
            self.upsample = Upsample(self.out_channels, **kw)

    def __call__(self, x):
        for j in range(self.num_blocks):
            x = self.block[j](x)
            if self.with_attn:
                x = self.attn[j](x)
        if self.resample == 'down':
            x = self.downsample(x)
        elif self.resample == 'up':
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """`mid`: block_1, attn_1 (always present, whatever `attn_resolutions` says), block_2."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    groups: int = NUM_GROUPS      # GroupNorm groups (AutoKLConfig.norm_groups)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.groups
        self.block_1 = ResnetBlock(self.channels, self.channels, groups=g, **kw)
        self.attn_1 = AttnBlock(self.channels, groups=g, **kw)
        self.block_2 = ResnetBlock(self.channels, self.channels, groups=g, **kw)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2*z_channels) (mean and logvar halves)."""
    config: AutoKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = cfg.norm_groups
        n = cfg.num_levels
        self.conv_in = Conv(cfg.ch, 3, 1, 1, **kw)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]  # (1,) + ch_mult, times ch
        self.down = [Level(widths[i], widths[i + 1], cfg.num_res_blocks, cfg.level_has_attn(i),
                           'down' if i != n - 1 else None, groups=g, **kw) for i in range(n)]
        self.mid = Mid(widths[-1], groups=g, **kw)
        self.norm_out = GroupNorm(g, NORM_EPS, **kw)
        self.conv_out = Conv(2 * cfg.z_channels, 3, 1, 1, **kw)  # double_z

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) -> image (B, h*f, w*f, out_ch), roughly in [-1, 1]."""
    config: AutoKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = cfg.norm_groups
        n = cfg.num_levels
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv(top, 3, 1, 1, **kw)
        self.mid = Mid(top, groups=g, **kw)
        # `up[i]` is the level at resolution / 2**i (the original prepends while walking
        # from the bottom, so index i is the same level as the encoder's `down[i]`); it is
        # entered from level i+1 (or the mid block) and has one block more than the encoder.
        self.up = [Level(cfg.ch * cfg.ch_mult[min(i + 1, n - 1)], cfg.ch * cfg.ch_mult[i],
                         cfg.num_res_blocks + 1, cfg.level_has_attn(i),
                         'up' if i != 0 else None, groups=g, **kw) for i in range(n)]
        self.norm_out = GroupNorm(g, NORM_EPS, **kw)
        self.conv_out = Conv(cfg.out_ch, 3, 1, 1, **kw)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

def _check_image_batch(x, channels: int, what: str, dims: str):
    if getattr(x, 'ndim', None) != 4 or x.shape[-1] != channels:
        raise ValueError(f'{what} must be a channels-last batch {dims}{channels}), got '
                         f'shape {tuple(getattr(x, "shape", ()))}'
                         + (' (channels-first? use x.transpose(0, 2, 3, 1))'
                            if getattr(x, 'ndim', None) == 4 and x.shape[1] == channels else ''))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f'{what} must be floating point, got {x.dtype}'
                         + (' (uint8 pixels? divide by 255)' if x.dtype == jnp.uint8 else ''))


class AutoencoderKL(nn.Module):
    """The kl-f8 AutoencoderKL (`autokl.py:AutoencoderKL`), channels-last.

    Attributes:
      config: an `AutoKLConfig`, or the config section (`cfg.model.vae.image`) it is built from.
      latent_scale: VD's `latent_scale_factor['image']`, used by `encode_images` /
        `decode_latents` only (`encode` / `decode` work on unscaled latents).
      dtype: compute dtype; GroupNorm statistics and the softmax run in float32 and the
        outputs are float32.

    Methods (call with `model.apply({'params': p}, ..., method=...)`):
      encode(x): x (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, embed_dim);
        logvar clamped to [-30, 20].
      decode(z): unscaled latent (B, h, w, embed_dim) -> image (B, 8h, 8w, 3), ~[-1, 1],
        not clipped.
      encode_images(images01, key=None): VD's `vae_encode`; see `vae_encode`.
      decode_latents(latents): VD's `vae_decode`; see `vae_decode`.
    """
    config: Any
    latent_scale: float = LATENT_SCALE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, 'config', as_autokl_config(self.config))
        super().__post_init__()

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = Dense(2 * cfg.embed_dim, kernel_axes=_CONV1X1_AXES, **kw)  # 1x1 conv
        self.post_quant_conv = Dense(cfg.z_channels, kernel_axes=_CONV1X1_AXES, **kw)

    # -- the network ------------------------------------------------------------------------
    def encode(self, x):
        """Posterior moments of images x (B, H, W, C) in [-1, 1]: (mean, logvar), float32."""
        _check_image_batch(x, self.config.in_channels, 'encode: x', '(B, H, W, ')
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # channel halves, as torch.chunk(dim=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """Unscaled latents z (B, h, w, embed_dim) -> images (B, h*f, w*f, C), float32."""
        _check_image_batch(z, self.config.embed_dim, 'decode: z', '(B, h, w, ')
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x):
        """Reconstruction through the posterior mean (used by `init`)."""
        mean, _ = self.encode(x)
        return self.decode(mean)

    # -- VD's conventions -------------------------------------------------------------------
    def encode_images(self, images01, key=None):
        """Images in [0, 1] -> scaled latents: a posterior sample drawn with PRNG `key`
        (`mean + exp(logvar / 2) * eps`), or the posterior mean if `key` is None."""
        _check_image_batch(images01, self.config.in_channels, 'images', '(B, H, W, ')
        mean, logvar = self.encode(images01 * 2.0 - 1.0)
        if key is None:
            z = mean
        else:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return z * self.latent_scale

    def decode_latents(self, latents):
        """Scaled latents -> images in [0, 1] (clipped), float32."""
        _check_image_batch(latents, self.config.embed_dim, 'latents', '(B, h, w, ')
        dec = self.decode(latents / self.latent_scale)
        return jnp.clip((dec + 1.0) / 2.0, 0.0, 1.0)

    def init_all(self, batch: int = 1):
        """Touch every parameter (for `init` / `abstract_params`) on a minimal input."""
        return self(*example_inputs(self.config, batch))


def example_inputs(config: AutoKLConfig, batch: int = 1):
    """(x (B, f, f, C) in [-1, 1],) for `AutoencoderKL.__call__`: the smallest legal image."""
    f = config.downsample_factor
    return (jnp.zeros((batch, f, f, config.in_channels), jnp.float32),)


def vae_encode(model: AutoencoderKL, params, images01, key=None, sample: bool = True):
    """VD's `vae_encode('image')`: images in [0, 1] -> latents scaled by 0.18215.

    Args:
      model: the `AutoencoderKL`.
      params: its parameters (the `params` collection, i.e. `variables['params']`).
      images01: (B, H, W, 3) floats in [0, 1] (H, W multiples of 8 to decode back to
        the same size).
      key: PRNG key of the posterior sample; required when `sample`.
      sample: draw `mean + std * eps` as the original does (`posterior.sample()`);
        False returns the posterior mean (deterministic).
    Returns:
      (B, H/8, W/8, 4) float32 latents, times `model.latent_scale`.
    Jit-compatible (wrap with `jax.jit(functools.partial(vae_encode, model), static_argnames='sample')`).
    """
    if sample and key is None:
        raise ValueError('vae_encode: sample=True needs a PRNG key (key=jax.random.key(..)); '
                         'pass sample=False for the posterior mean')
    return model.apply({'params': params}, images01, key if sample else None,
                       method=AutoencoderKL.encode_images)


def vae_decode(model: AutoencoderKL, params, latents):
    """VD's `vae_decode('image')`: latents scaled by 0.18215 -> images (B, 8h, 8w, 3) in [0, 1]."""
    return model.apply({'params': params}, latents, method=AutoencoderKL.decode_latents)
