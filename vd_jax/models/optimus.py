"""The text VAE of Versatile Diffusion: Optimus (SHI-Labs `lib/model_zoo/optimus.py`,
`optimus_models/optimus_bert.py`, `optimus_gpt2.py`).

  * Encoder `BertForLatentConnector`: BERT-base-cased (post-LN, erf-GELU, LN eps 1e-12),
    pooler tanh(Linear(h[:, 0])), then `linear` (no bias) -> (mu, logvar). VD encodes a
    sentence to **mu** (no sampling); padding id 0 is masked out of attention.
  * Decoder `GPT2ForLatentConnector`: GPT-2 small (pre-LN, tanh-GELU, LN eps 1e-5, LM head
    tied to `wte`) that sees the latent z twice:
      1. every input embedding gets `linear_emb(z)` added;
      2. `linear(z)` is split into one 768-vector per layer, used directly (no c_attn) as
         ONE extra past key AND value of that layer, split into heads like any key: a
         memory slot every token attends to. Real tokens therefore sit at positions
         1, 2, ... (the memory takes position 0 of the past).
    A KV cache (`init_cache` / `step`) makes decoding one token per step cheap and
    jittable; slot 0 of the cache is the memory, slot j >= 1 is token j-1 (position id j).
Eval mode throughout: the original demo never calls `.eval()` and decodes with dropout 0.1
active; vd_jax does not reproduce that noise.

Parameter paths mirror the state-dict names of `vae.text.*` (v1.0 checkpoint) /
`optimus-vae.pth`: `encoder.encoder.layer.3.attention.self.query.weight` lives at
`encoder/encoder/layer_3/attention/self/query/kernel`, `decoder.transformer.h.0.attn.c_attn.weight`
(a GPT-2 Conv1D, already (in, out)) at `decoder/transformer/h_0/attn/c_attn/kernel`, the
word embeddings at `.../word_embeddings/embedding`. `decoder.lm_head.weight` has no leaf of
its own: the logits are `h @ wte.T`.

The BERT encoder lives in `vd_jax.models.optimus_bert`.
Networks only: encoding sentences and decoding latents to text (tokenisation, the KV-cache
decoding loop, the original's string clean-up) live in `vd_jax.text_io`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding_names as ax
from vd_jax.models.common import config_from_dict, embed
from vd_jax.models.init import abstract_params
from vd_jax.models.layers import Dense, LayerNorm, attention
from vd_jax.models.optimus_bert import MASK_VALUE, BertConfig, BertForLatentConnector

Dtype = Any

# GPT-2 ids of the tokens Optimus adds to the 50,257 BPE tokens (optimus.py:30-34).
PAD_ID, BOS_ID, EOS_ID = 50257, 50258, 50259
# BERT-base-cased: [PAD] = 0 (also the attention-mask criterion `ids > 0`), [CLS], [SEP].
BERT_PAD_ID, BERT_CLS_ID, BERT_SEP_ID = 0, 101, 102
# optimus_vae_next.encode: at most 77 word pieces, then [CLS] ... [SEP].
MAX_WORDPIECES = 77
# optimus_vae_next.decode: at most 30 tokens including <BOS> and <EOS>.
MAX_LENGTH = 30


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The decoder (`optimus_gpt2_decoder`); MLP width is 4 * n_embd as in GPT-2."""
    vocab_size: int = 50260
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class OptimusConfig:
    """`optimus_v1`: latent width, the two towers, decoding limits and special token ids.

    The token ids belong to the vocabularies the model was trained with (defaults: BERT-base-
    cased and GPT-2 + Optimus' three added tokens); a model trained with other vocabularies
    sets them here, never in code.
    """
    latent_size: int = 768
    encoder: BertConfig = BertConfig()
    decoder: GPT2Config = GPT2Config()
    max_length: int = MAX_LENGTH           # decoded tokens incl. <BOS> and <EOS>
    max_wordpieces: int = MAX_WORDPIECES   # encoder input, before [CLS] ... [SEP]
    pad_id: int = PAD_ID                   # GPT-2 side
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    bert_pad_id: int = BERT_PAD_ID
    bert_cls_id: int = BERT_CLS_ID
    bert_sep_id: int = BERT_SEP_ID

    _TOKEN_KEYS = ('max_length', 'max_wordpieces', 'pad_id', 'bos_id', 'eos_id', 'bert_pad_id',
                   'bert_cls_id', 'bert_sep_id')

    @classmethod
    def from_dict(cls, d) -> 'OptimusConfig':
        """From `configs.common.optimus()` (`cfg.model.vae.text`): latent_size, encoder,
        decoder (original/HF key names), and optionally max_length, max_wordpieces and the
        special token ids."""
        d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
        unknown = sorted(set(d) - {'latent_size', 'encoder', 'decoder', *cls._TOKEN_KEYS})
        if unknown:
            raise ValueError(f'Optimus config: unknown key(s) {unknown}')
        latent = int(d.get('latent_size', 768))
        enc = config_from_dict(BertConfig, d.get('encoder', {}), 'Optimus encoder config',
                               fixed={'hidden_act': 'gelu', 'latent_size': latent})
        dec = config_from_dict(GPT2Config, d.get('decoder', {}), 'Optimus decoder config',
                               aliases={'hidden_size': 'n_embd', 'num_attention_heads': 'n_head',
                                        'num_hidden_layers': 'n_layer',
                                        'max_position_embeddings': 'n_positions',
                                        'n_ctx': 'n_positions'},
                               fixed={'latent_size': latent})
        tokens = {k: int(d[k]) for k in cls._TOKEN_KEYS if k in d}
        cfg = cls(latent, enc, dec, **tokens)
        if enc.hidden_size % enc.num_attention_heads:
            raise ValueError(f'Optimus encoder: hidden_size {enc.hidden_size} is not divisible '
                             f'by {enc.num_attention_heads} heads')
        if dec.n_embd % dec.n_head:
            raise ValueError(f'Optimus decoder: n_embd {dec.n_embd} is not divisible by '
                             f'{dec.n_head} heads')
        if not 2 <= cfg.max_length <= dec.n_positions:
            raise ValueError(f'Optimus: max_length {cfg.max_length} must be in [2, '
                             f'{dec.n_positions}] (n_positions)')
        if cfg.max_wordpieces + 2 > enc.max_position_embeddings:
            raise ValueError(f'Optimus: max_wordpieces {cfg.max_wordpieces} + 2 exceeds the '
                             f'encoder\'s {enc.max_position_embeddings} positions')
        for k in ('pad_id', 'bos_id', 'eos_id'):
            if not 0 <= getattr(cfg, k) < dec.vocab_size:
                raise ValueError(f'Optimus: {k}={getattr(cfg, k)} is outside the decoder '
                                 f'vocabulary ({dec.vocab_size})')
        for k in ('bert_pad_id', 'bert_cls_id', 'bert_sep_id'):
            if not 0 <= getattr(cfg, k) < enc.vocab_size:
                raise ValueError(f'Optimus: {k}={getattr(cfg, k)} is outside the encoder '
                                 f'vocabulary ({enc.vocab_size})')
        return cfg


def as_optimus_config(config) -> OptimusConfig:
    return config if isinstance(config, OptimusConfig) else OptimusConfig.from_dict(config)


# ----------------------------------------------------------------------------------------
# GPT-2 decoder (optimus_gpt2.py: Attention, MLP, Block, GPT2Model_XX, GPT2ForLatentConnector_XX)
# ----------------------------------------------------------------------------------------

class GPT2Attention(nn.Module):
    """Causal self-attention over a KV cache; c_attn/c_proj are GPT-2 Conv1D = Dense."""
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d, kw = self.config.n_embd, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.c_attn = Dense(3 * d, **kw)
        self.c_proj = Dense(d, **kw)

    def __call__(self, x, layer_cache, index, bias):
        """x (B, T, D); layer_cache {'k', 'v'}: (B, S, D); the T new keys/values go to slots
        index .. index+T-1; bias (1, 1, T, S) masks slots after each query's own."""
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        ck = jax.lax.dynamic_update_slice(layer_cache['k'], k.astype(layer_cache['k'].dtype),
                                          (0, index, 0))
        cv = jax.lax.dynamic_update_slice(layer_cache['v'], v.astype(layer_cache['v'].dtype),
                                          (0, index, 0))
        # scale 1/sqrt(head_dim) (Block(..., scale=True)); the attention() default
        out = attention(q, ck, cv, self.config.n_head, bias=bias, dtype=self.dtype)
        return self.c_proj(out), {'k': ck, 'v': cv}


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d, kw = self.config.n_embd, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.c_fc = Dense(4 * d, **kw)
        self.c_proj = Dense(d, **kw)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # GPT-2's tanh GELU


class GPT2Block(nn.Module):
    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_1 = LayerNorm(c.layer_norm_epsilon, **kw)
        self.attn = GPT2Attention(c, **kw)
        self.ln_2 = LayerNorm(c.layer_norm_epsilon, **kw)
        self.mlp = GPT2MLP(c, **kw)

    def __call__(self, x, layer_cache, index, bias):
        a, layer_cache = self.attn(self.ln_1(x), layer_cache, index, bias)
        x = x + a
        return x + self.mlp(self.ln_2(x)), layer_cache


class GPT2Transformer(nn.Module):
    """`GPT2Model_XX` with latent injection (`latent_as_gpt_emb`, `latent_as_gpt_memory`)."""
    config: GPT2Config
    latent_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.wte = embed(c.vocab_size, c.n_embd, **kw, axes=(ax.VOCAB, ax.EMBED))
        self.wpe = embed(c.n_positions, c.n_embd, **kw, axes=(None, ax.EMBED))
        self.h = [GPT2Block(c, **kw) for _ in range(c.n_layer)]
        self.ln_f = LayerNorm(c.layer_norm_epsilon, **kw)
        # z -> one memory vector per layer / an embedding offset (both bias-free)
        self.linear = Dense(c.n_embd * c.n_layer, use_bias=False, **kw)
        self.linear_emb = Dense(c.n_embd, use_bias=False, **kw)

    def init_cache(self, z, batch: int, num_slots: int):
        """A cache of `num_slots` key/value slots per layer.

        With a latent z (B, latent): slot 0 holds the layer's memory `linear(z)` chunk as key
        and value, `index` (the next free slot, = the next position id) starts at 1 and
        `latent_emb = linear_emb(z)` is added to every input embedding. With z None: plain
        GPT-2 (no memory, positions from 0, no embedding offset).
        """
        c = self.config
        zeros = jnp.zeros((batch, num_slots, c.n_embd), self.dtype)
        if z is None:
            layers = tuple({'k': zeros, 'v': zeros} for _ in range(c.n_layer))
            return {'index': jnp.int32(0), 'latent_emb': jnp.zeros((batch, c.n_embd), self.dtype),
                    'layers': layers}
        mem = self.linear(z).reshape(batch, c.n_layer, c.n_embd).astype(self.dtype)
        layers = []
        for i in range(c.n_layer):
            m = zeros.at[:, 0].set(mem[:, i])   # the same vector is key and value
            layers.append({'k': m, 'v': m})
        return {'index': jnp.int32(1), 'latent_emb': self.linear_emb(z).astype(self.dtype),
                'layers': tuple(layers)}

    def __call__(self, input_ids, cache):
        """input_ids (B, T) at positions index .. index+T-1 -> (hidden (B, T, D), cache)."""
        t = input_ids.shape[1]
        s = cache['layers'][0]['k'].shape[1]
        index = cache['index']
        pos = index + jnp.arange(t)
        h = self.wte(input_ids) + self.wpe(pos)[None] + cache['latent_emb'][:, None]
        # slot j is visible to the query at slot index + t iff j <= index + t: causal over the
        # tokens, the memory slot 0 always visible, unwritten slots hidden
        visible = jnp.arange(s)[None, :] <= pos[:, None]
        bias = jnp.where(visible, 0.0, MASK_VALUE)[None, None].astype(jnp.float32)
        layers = []
        for block, layer_cache in zip(self.h, cache['layers']):
            h, layer_cache = block(h, layer_cache, index, bias)
            layers.append(layer_cache)
        new_cache = {'index': index + t, 'latent_emb': cache['latent_emb'], 'layers': tuple(layers)}
        return self.ln_f(h), new_cache

    def logits(self, h, candidates=None):
        """Tied LM head: h (..., D) @ wte.T -> (..., V) float32; with `candidates` (C,) token
        ids, only their columns: (..., C) (a sampled softmax in training)."""
        if candidates is None:
            return self.wte.attend(h).astype(jnp.float32)
        w = jnp.take(self.wte.embedding, candidates, axis=0).astype(self.dtype)   # (C, D)
        return jnp.dot(h.astype(self.dtype), w.T).astype(jnp.float32)


class GPT2ForLatentConnector(nn.Module):
    """`GPT2ForLatentConnector_XX`: the transformer + the tied LM head."""
    config: GPT2Config
    latent_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.transformer = GPT2Transformer(self.config, self.latent_size, dtype=self.dtype,
                                           param_dtype=self.param_dtype)

    def _check_z(self, z, batch=None):
        if z is None:
            return
        if z.ndim != 2 or z.shape[1] != self.latent_size or (batch is not None
                                                            and z.shape[0] != batch):
            want = f'({batch if batch is not None else "B"}, {self.latent_size})'
            raise ValueError(f'latent z must be {want}, got shape {tuple(z.shape)}')

    def init_cache(self, z, batch: int, num_slots: int):
        """See `GPT2Transformer.init_cache`; z (B, latent) or None."""
        self._check_z(z, batch)
        if num_slots > self.config.n_positions:
            raise ValueError(f'{num_slots} cache slots exceed the {self.config.n_positions} '
                             'GPT-2 positions')
        return self.transformer.init_cache(z, batch, num_slots)

    def step(self, input_ids, cache, candidates=None):
        """input_ids (B, T) -> (logits (B, T, V) float32, cache). The caller keeps
        index + T <= number of slots (dynamic_update_slice would clamp silently).
        candidates: (C,) token ids -> logits (B, T, C) of those tokens only."""
        h, cache = self.transformer(input_ids, cache)
        return self.transformer.logits(h, candidates), cache

    def __call__(self, input_ids, z=None, candidates=None):
        """Teacher-forced logits (B, T, V) of a whole sequence; with z (B, latent) the latent
        is injected as in Optimus (positions 1..T, memory slot), without it this is plain
        GPT2LMHeadModel. candidates: (C,) token ids -> (B, T, C)."""
        if input_ids.ndim != 2:
            raise ValueError(f'input_ids must be (B, T), got shape {input_ids.shape}')
        b, t = input_ids.shape
        cache = self.init_cache(z, b, t + (z is not None))
        return self.step(input_ids, cache, candidates)[0]


# ----------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------

class Optimus(nn.Module):
    """Optimus text VAE (`optimus_vae_next`): `encoder` (BERT) and `decoder` (GPT-2).

    Attributes:
      config: an `OptimusConfig` or the config section (`cfg.model.vae.text`).
      dtype: compute dtype (norm statistics, softmax, logits and moments stay float32).

    Methods (via `model.apply({'params': p}, ..., method=...)`):
      encode(input_ids): (B, L) BERT ids, pad 0 -> (mu, logvar) (B, latent).
      decode_logits(input_ids, z[, candidates]): teacher-forced decoder logits (B, T, V)
        (or (B, T, C) over C candidate token ids).
      init_cache(z, num_slots) / decode_step(input_ids, cache): the KV-cache decoder.
    The network works on unscaled latents; VD's latents are `latent_scale` x mu (1 for the
    released model, whose config has latent_scale_factor text 1.0).
    """
    config: Any
    latent_scale: float = 1.0  # VD's latent_scale_factor['text'] (1 for the released model)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, 'config', as_optimus_config(self.config))
        super().__post_init__()

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = BertForLatentConnector(c.encoder, c.latent_size, **kw)
        self.decoder = GPT2ForLatentConnector(c.decoder, c.latent_size, **kw)

    def encode(self, input_ids):
        """BERT ids (B, L) ([CLS] ... [SEP], pad 0) -> (mu, logvar), each (B, latent)."""
        _, pooled = self.encoder(input_ids, attention_mask=(input_ids != self.config.bert_pad_id))
        return self.encoder.moments(pooled)

    def decode_logits(self, input_ids, z, candidates=None):
        """GPT-2 ids (B, T) and z (B, latent) or None -> logits (B, T, V), teacher-forced;
        with candidates (C,) token ids, the logits of those tokens only (B, T, C)."""
        return self.decoder(input_ids, z, candidates)

    def init_cache(self, z, num_slots: int):
        """z (B, latent) -> KV cache with the memory in slot 0 and `num_slots - 1` free slots."""
        return self.decoder.init_cache(z, z.shape[0] if z is not None else 1, num_slots)

    def decode_step(self, input_ids, cache):
        """input_ids (B, T) at the cache's next positions -> (logits (B, T, V), cache)."""
        return self.decoder.step(input_ids, cache)

    def __call__(self, encoder_ids, decoder_ids, key=None):
        """The VAE end to end, teacher-forced (what training optimises).

        encoder_ids (B, L) BERT ids; decoder_ids (B, T) GPT-2 ids (<BOS> ...); key: PRNG key
        of the posterior sample z = mu + exp(logvar / 2) * eps, or None for z = mu.
        Returns (mu, logvar, logits (B, T, V)), float32.
        """
        mu, logvar = self.encode(encoder_ids)
        z = mu if key is None else (
            mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, jnp.float32))
        return mu, logvar, self.decode_logits(decoder_ids, z)

    def init_all(self, batch: int = 1):
        """Touch every parameter (for `init` / `abstract_params`) on a minimal input."""
        return self(*example_inputs(self.config, batch))


def example_inputs(config: OptimusConfig, batch: int = 1):
    """(encoder_ids (B, 2), decoder_ids (B, 1)) for `Optimus.__call__`: [CLS] [CLS] / <BOS>."""
    return (jnp.full((batch, 2), config.bert_cls_id, jnp.int32),
            jnp.full((batch, 1), config.bos_id, jnp.int32))


def param_count(model: Optimus) -> Dict[str, int]:
    """{'encoder': n, 'decoder': n} (the tied LM head counted once, it has no own leaf)."""
    p = abstract_params(model)
    return {k: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(p[k])))
            for k in ('encoder', 'decoder')}
