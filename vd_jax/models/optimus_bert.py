"""The encoder of Optimus, VD's text VAE (SHI-Labs `optimus_models/optimus_bert.py`:
BertEmbeddings, BertLayer, BertPooler, `BertForLatentConnector_XX`): BERT-base-cased, post-LN,
erf-GELU, LayerNorm eps 1e-12, then `linear` (no bias) from the pooled [CLS] state to
(mu, logvar). Parameter paths mirror `vae.text.encoder.*`; the whole model is
`vd_jax.models.optimus.Optimus`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.common import embed
from vd_jax.models.layers import Dense, LayerNorm, attention

Dtype = Any

# Additive attention mask value of both original models (-10000 on masked logits; with
# float32 softmax it zeroes the weight exactly like -inf would, without inf arithmetic).
MASK_VALUE = -1e4


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The encoder (`optimus_bert_encoder` in configs/model/optimus.yaml)."""
    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = embed(c.vocab_size, c.hidden_size, **kw, axes=(ax.VOCAB, ax.EMBED))
        self.position_embeddings = embed(c.max_position_embeddings, c.hidden_size, **kw,
                                          axes=(None, ax.EMBED))
        self.token_type_embeddings = embed(c.type_vocab_size, c.hidden_size, **kw,
                                            axes=(None, ax.EMBED))
        self.LayerNorm = LayerNorm(c.layer_norm_eps, **kw)

    def __call__(self, input_ids, token_type_ids):  # (B, L) int -> (B, L, D)
        pos = jnp.arange(input_ids.shape[1])
        h = (self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d, kw = self.config.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query = Dense(d, **kw)
        self.key = Dense(d, **kw)
        self.value = Dense(d, **kw)

    def __call__(self, x, bias):
        return attention(self.query(x), self.key(x), self.value(x),
                         self.config.num_attention_heads, bias=bias, dtype=self.dtype)


class BertResidualOutput(nn.Module):
    """`BertSelfOutput` / `BertOutput`: LayerNorm(dense(x) + residual) (post-LN)."""
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.dense = Dense(self.config.hidden_size, **kw)
        self.LayerNorm = LayerNorm(self.config.layer_norm_eps, **kw)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.self = BertSelfAttention(self.config, **kw)   # state-dict name `attention.self`
        self.output = BertResidualOutput(self.config, **kw)

    def __call__(self, x, bias):
        return self.output(self.self(x, bias), x)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.dense = Dense(self.config.intermediate_size, dtype=self.dtype,
                           param_dtype=self.param_dtype)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x), approximate=False)   # BERT's exact erf GELU


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = BertAttention(self.config, **kw)
        self.intermediate = BertIntermediate(self.config, **kw)
        self.output = BertResidualOutput(self.config, **kw)

    def __call__(self, x, bias):
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.layer = [BertLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
                      for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x, bias):
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertPooler(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.dense = Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, h):  # (B, L, D) -> (B, D): the [CLS] position
        return jnp.tanh(self.dense(h[:, 0]))


class BertForLatentConnector(nn.Module):
    """BERT + pooler + `linear` (D -> 2 * latent, no bias) (`BertForLatentConnector_XX`)."""
    config: BertConfig
    latent_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(self.config, **kw)
        self.encoder = BertEncoder(self.config, **kw)
        self.pooler = BertPooler(self.config, **kw)
        self.linear = Dense(2 * self.latent_size, use_bias=False, **kw)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, L) int -> (sequence_output (B, L, D), pooled (B, D)).

        attention_mask (B, L) in {0, 1} (default all ones, as the original's forward);
        masked keys get -10000 added to their logits.
        """
        if input_ids.ndim != 2:
            raise ValueError(f'input_ids must be (B, L), got shape {input_ids.shape}')
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f'input_ids: {input_ids.shape[1]} tokens exceed the '
                             f'{self.config.max_position_embeddings} BERT positions')
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        bias = (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * MASK_VALUE
        h = self.encoder(self.embeddings(input_ids, token_type_ids), bias)
        return h, self.pooler(h)

    def moments(self, pooled):
        """pooled (B, D) -> (mu, logvar), each (B, latent), float32 (`linear(..).chunk(2)`)."""
        mu, logvar = jnp.split(self.linear(pooled).astype(jnp.float32), 2, axis=-1)
        return mu, logvar
