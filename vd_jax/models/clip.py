"""CLIP ViT-L/14 context encoders of Versatile Diffusion (SHI-Labs `lib/model_zoo/clip.py`).

The two towers of HF `openai/clip-vit-large-patch14` with their projections, and VD's way
of turning them into *all-token* contexts for cross-attention:

  * text:  context = text_projection(last_hidden_state)            (B, 77, 768)
                     / ||text_projection(pooled)||, pooled = hidden state at the EOT token;
  * image: context = visual_projection(post_layernorm(last_hidden))  (B, 257, 768)
                     / ||that, at the CLS token||.
One scalar per sample divides every token, so a context keeps the relative token norms.

Parameter paths mirror the HF state-dict names: `text_model.encoder.layers.3.self_attn.q_proj.weight`
lives at `text_model/encoder/layers_3/self_attn/q_proj/kernel`, `visual_projection.weight` at
`visual_projection/kernel`. Images are channels-last: pixel values (B, 224, 224, 3), already
CLIP-normalised (`vd_jax.image_io.clip_preprocess`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.common import config_from_dict, embed
from vd_jax.models.layers import Dense, LayerNorm, attention

Dtype = Any

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """HF `CLIPTextConfig` fields (defaults: openai/clip-vit-large-patch14)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'CLIPTextConfig':
        """From `cfg.model.ctx.text` (or an HF text config dict)."""
        return config_from_dict(cls, d, 'CLIP text config')


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """HF `CLIPVisionConfig` fields (defaults: openai/clip-vit-large-patch14)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'CLIPVisionConfig':
        """From `cfg.model.ctx.image` (or an HF vision config dict)."""
        return config_from_dict(cls, d, 'CLIP vision config')

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 257 for ViT-L/14 at 224."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _as_config(config, cls):
    return config if isinstance(config, cls) else cls.from_dict(config)


def activation(name: str):
    """HF `ACT2FN` subset used by CLIP checkpoints."""
    if name == 'quick_gelu':  # OpenAI CLIP: x * sigmoid(1.702 x)
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == 'gelu':
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ('gelu_new', 'gelu_pytorch_tanh'):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"CLIP hidden_act {name!r} is not supported (quick_gelu, gelu, gelu_new)")


# ----------------------------------------------------------------------------------------
# Shared transformer (HF CLIPEncoder): pre-LN blocks
# ----------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (HF `CLIPAttention`)."""
    embed_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f'CLIP: hidden_size {self.embed_dim} is not divisible by '
                             f'{self.num_heads} heads')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = Dense(self.embed_dim, **kw)
        self.k_proj = Dense(self.embed_dim, **kw)
        self.v_proj = Dense(self.embed_dim, **kw)
        self.out_proj = Dense(self.embed_dim, **kw)

    def __call__(self, x, bias=None):  # x (B, L, D); bias broadcastable to (B, H, L, L)
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads,
                        bias=bias, dtype=self.dtype)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str = 'quick_gelu'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = Dense(self.intermediate_size, **kw)
        self.fc2 = Dense(self.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN1(x)), then + mlp(LN2(x))."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layer_norm1 = LayerNorm(self.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(self.hidden_size, self.num_heads, **kw)
        self.layer_norm2 = LayerNorm(self.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, **kw)

    def __call__(self, x, bias=None):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads,
                                        self.hidden_act, self.layer_norm_eps, dtype=self.dtype,
                                        param_dtype=self.param_dtype)
                       for _ in range(self.num_hidden_layers)]

    def __call__(self, x, bias=None):  # (B, L, D) -> (B, L, D)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _encoder(cfg, dtype, param_dtype) -> CLIPEncoder:
    return CLIPEncoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                       cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                       dtype=dtype, param_dtype=param_dtype)


# ----------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------

class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.token_embedding = embed(self.vocab_size, self.hidden_size, self.dtype,
                                      self.param_dtype, (ax.VOCAB, ax.EMBED))
        self.position_embedding = embed(self.max_position_embeddings, self.hidden_size,
                                         self.dtype, self.param_dtype, (None, ax.EMBED))

    def __call__(self, input_ids):  # (B, L) int -> (B, L, D)
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPTextTransformer(nn.Module):
    """HF `CLIPTextModel` body: embeddings, causal encoder, final_layer_norm, EOT pooling."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings,
                                             c.hidden_size, **kw)
        self.encoder = _encoder(c, **kw)
        self.final_layer_norm = LayerNorm(c.layer_norm_eps, **kw)

    def __call__(self, input_ids):
        """input_ids (B, L<=77) int -> (last_hidden_state (B, L, D), pooled (B, D)).

        No padding mask, as VD (the EOT padding is attended to, but the causal mask keeps it
        out of every position up to the first EOT). Pooled = the hidden state at argmax(ids):
        the first EOT, since 49407 is the largest id (transformers 4.24 semantics; newer
        versions look for the first `eos_token_id`, which is the same token for CLIP-tokenized
        input).
        """
        b, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f'CLIP text: {length} tokens, more than max_position_embeddings='
                             f'{self.config.max_position_embeddings}')
        h = self.embeddings(input_ids)
        causal = jnp.tril(jnp.ones((length, length), bool))
        bias = jnp.where(causal, 0.0, -1e9).astype(jnp.float32)[None, None]
        h = self.final_layer_norm(self.encoder(h, bias))
        eot = jnp.argmax(input_ids, axis=-1)
        pooled = jnp.take_along_axis(h, eot[:, None, None], axis=1)[:, 0]
        return h, pooled


def all_token_context(projected, embeds, token_mask=None):
    """VD's context of a CLIP tower: every projected token (B, L, P) divided by the norm of
    the pooled embedding (B, P), one scalar per sample, in float32 (so the relative token
    norms stay); optional token weights (B, L) multiply the result (masked image contexts)."""
    norm = jnp.linalg.norm(embeds.astype(jnp.float32), axis=-1)
    context = projected.astype(jnp.float32) / norm[:, None, None]
    if token_mask is not None:
        context = context * token_mask[..., None].astype(jnp.float32)
    return context


class CLIPTextContext(nn.Module):
    """VD's text context encoder: `CLIPTextModelWithProjection` + all-token normalisation.

    Params: `text_model/...`, `text_projection/kernel` (D, P), no bias.
    """
    config: Any  # CLIPTextConfig or a dict of its fields (cfg.model.ctx.text)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = _as_config(self.config, CLIPTextConfig)
        self.text_model = CLIPTextTransformer(c, dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_projection = Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype)

    def __call__(self, input_ids) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
        """input_ids (B, 77) int (`vd_jax.tokenizers.clip_tokenizer()(prompts)`).

        Returns:
          context (B, 77, P) = text_projection(last_hidden_state) / ||text_embeds||, in float32
            (one scalar per sample);
          aux: last_hidden_state (B, 77, D) after final_layer_norm, pooled (B, D) (EOT
            token), text_embeds (B, P) = text_projection(pooled), projected (B, 77, P)
            before the division.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f'CLIP text: input_ids must be (B, L) integers, got shape '
                             f'{input_ids.shape} dtype {input_ids.dtype}')
        h, pooled = self.text_model(input_ids)
        projected = self.text_projection(h)
        text_embeds = self.text_projection(pooled)
        context = all_token_context(projected, text_embeds)
        return context, dict(last_hidden_state=h, pooled=pooled, text_embeds=text_embeds,
                             projected=projected)

    def init_all(self, batch: int = 1):
        """Touch every parameter (for `init` / `abstract_params`)."""
        return self(*text_example_inputs(_as_config(self.config, CLIPTextConfig), batch))


# ----------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Non-overlapping patch conv without bias (HF `patch_embedding`): kernel HWIO (p, p, C, D)."""
    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) -> (B, H/p, W/p, D)
        p = self.patch_size
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                            (None, None, ax.CONV_IN, ax.CONV_OUT))
        kernel = self.param('kernel', init, (p, p, x.shape[-1], self.features), self.param_dtype)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(p, p),
            padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class CLIPVisionEmbeddings(nn.Module):
    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.hidden_size ** -0.5),
                                            (ax.EMBED,))
        self.class_embedding = self.param('class_embedding', init, (self.hidden_size,),
                                          self.param_dtype)
        self.patch_embedding = PatchEmbedding(self.hidden_size, self.patch_size,
                                              dtype=self.dtype, param_dtype=self.param_dtype)
        n = (self.image_size // self.patch_size) ** 2 + 1
        self.position_embedding = embed(n, self.hidden_size, self.dtype, self.param_dtype,
                                         (None, ax.EMBED))

    def __call__(self, pixel_values):  # (B, H, W, C) -> (B, 1 + patches, D)
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)
        # (B, gh, gw, D) row-major == PyTorch's flatten(2).transpose(1, 2) of (B, D, gh, gw)
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, patches.shape[-1]))
        h = jnp.concatenate([cls, patches], axis=1)
        return h + self.position_embedding(jnp.arange(h.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
    """HF `CLIPVisionModel` body: embeddings, pre_layrnorm (sic), encoder, post_layernorm."""
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPVisionEmbeddings(c.hidden_size, c.image_size, c.patch_size, **kw)
        self.pre_layrnorm = LayerNorm(c.layer_norm_eps, **kw)
        self.encoder = _encoder(c, **kw)
        self.post_layernorm = LayerNorm(c.layer_norm_eps, **kw)

    def __call__(self, pixel_values, token_mask=None):
        """pixel_values (B, S, S, C) -> last_hidden_state (B, 1 + (S/p)^2, D), before post_layernorm.

        token_mask (B, 1 + (S/p)^2): optional weights multiplying the embeddings (VD's
        masked image context, `clip.py:_encode_wmask`)."""
        h = self.embeddings(pixel_values)
        if token_mask is not None:
            h = h * token_mask[..., None].astype(h.dtype)
        return self.encoder(self.pre_layrnorm(h))


class CLIPImageContext(nn.Module):
    """VD's image context encoder: `CLIPVisionModelWithProjection` + all-token normalisation.

    Params: `vision_model/...`, `visual_projection/kernel` (D, P), no bias.
    """
    config: Any  # CLIPVisionConfig or a dict of its fields (cfg.model.ctx.image)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = _as_config(self.config, CLIPVisionConfig)
        self.vision_model = CLIPVisionTransformer(c, dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_projection = Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype)

    def __call__(self, pixel_values, token_mask=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
        """pixel_values (B, 224, 224, 3) float, CLIP-normalised (`vd_jax.image_io.clip_preprocess`).

        token_mask: optional (B, 257) weights (`vd_jax.image_io.clip_token_mask`): the
          multi-context demo's masked encoding (`clip.py:_encode_wmask`): the embeddings
          are multiplied by it before the encoder, and the normalised context after.

        Returns:
          context (B, 257, P) = visual_projection(post_layernorm(last_hidden_state)) divided
            by the norm of its CLS token (token 0), in float32;
          aux: last_hidden_state (B, 257, D) before post_layernorm, pooled (B, D) =
            post_layernorm(CLS), image_embeds (B, P) = visual_projection(pooled),
            projected (B, 257, P) before the division.
        """
        c = _as_config(self.config, CLIPVisionConfig)
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f'CLIP vision: pixel_values must be (B, {want[0]}, {want[1]}, '
                             f'{want[2]}) channels-last, got {tuple(pixel_values.shape)}')
        h = self.vision_model(pixel_values, token_mask)
        projected = self.visual_projection(self.vision_model.post_layernorm(h))
        image_embeds = projected[:, 0]
        context = all_token_context(projected, image_embeds, token_mask)
        pooled = self.vision_model.post_layernorm(h[:, 0])
        return context, dict(last_hidden_state=h, pooled=pooled, image_embeds=image_embeds,
                             projected=projected)

    def init_all(self, batch: int = 1):
        """Touch every parameter (for `init` / `abstract_params`)."""
        return self(*vision_example_inputs(_as_config(self.config, CLIPVisionConfig), batch))


# ----------------------------------------------------------------------------------------
# Example inputs (the model-family interface, `vd_jax.models.FAMILIES`)
# ----------------------------------------------------------------------------------------

def text_example_inputs(config: CLIPTextConfig, batch: int = 1):
    """(input_ids (B, max_position_embeddings) int32,) for `CLIPTextContext.__call__`."""
    return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def vision_example_inputs(config: CLIPVisionConfig, batch: int = 1):
    """(pixel_values (B, S, S, C) float32,) for `CLIPImageContext.__call__`."""
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels),
                      jnp.float32),)
