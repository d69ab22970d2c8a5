"""The Optimus text VAE (`vd_jax.models.optimus`) and its converter
(`vd_jax.convert.optimus_rules`).

References: transformers' `BertModel` and `GPT2LMHeadModel` at the tiny config of
`configs.common.optimus(tiny=True)` (width 32, 2 layers, 2 heads, latent 16, the real
vocabularies), plus random torch `nn.Linear`s for `encoder.linear`,
`decoder.transformer.linear` and `linear_emb`. Every weight gets N(0, 0.3) (not HF's 0.02
init, which makes attention nearly uniform and would hide a q/k mix-up) and every 1-D
parameter is perturbed, so a permuted or swapped tensor cannot hide. Weights reach our
module only through the converter, from a v1.0-style state dict (`vae.text.*`, with the
12-style `attn.bias` mask buffers and the tied `lm_head.weight`).

The latent injection reference is transformers' GPT-2 itself: inputs_embeds = wte(ids) +
linear_emb(z), one past key/value slot per layer holding linear(z)'s chunk (split into
heads), position ids 1..T, attention mask over memory + tokens.

Tolerance 1e-4 (max abs) on hidden states, pooled output, mu and logits of magnitude <= ~10:
both sides are fp32 and differ only by summation order (measured 1e-6 .. 1e-5); any
mis-mapped tensor gives errors of order 1e-1 or more.
"""

import jax
import jax.numpy as jnp
import listing
import numpy as np
import pytest
import torch

from configs.common import optimus as optimus_cfg
from vd_jax.checkpoint import flatten
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint, plan_conversion
from vd_jax.convert.parts import detect_layout
from vd_jax.convert.sources import ShapeSource
from vd_jax import text_io
from vd_jax.errors import CheckpointError
from vd_jax.models.optimus import BOS_ID, EOS_ID, PAD_ID, Optimus, param_count
from vd_jax.text_io import (decode_ids, decode_latent, encode_ids, encode_text, ids_to_text,
                            remove_repeated_ngrams, tokenize_for_encoder)

TOL = 1e-4
D, LATENT, LAYERS, HEADS = 32, 16, 2, 2


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope='module')
def ref():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    cfg = load_config('tiny').model
    enc, dec = cfg.vae.text.encoder, cfg.vae.text.decoder
    assert cfg.vae.text.latent_size == LATENT and enc.hidden_size == dec.n_embd == D
    gen = torch.Generator().manual_seed(0)
    bert = _randomize(BertModel(BertConfig(hidden_act='gelu', **enc)), gen)
    gpt = _randomize(GPT2LMHeadModel(GPT2Config(activation_function='gelu_new', **dec)), gen)
    lin_b = _randomize(torch.nn.Linear(D, 2 * LATENT, bias=False), gen)
    lin = _randomize(torch.nn.Linear(LATENT, D * LAYERS, bias=False), gen)
    lin_e = _randomize(torch.nn.Linear(LATENT, D, bias=False), gen)
    sd = {f'vae.text.encoder.{k}': v for k, v in bert.state_dict().items()}
    sd['vae.text.encoder.linear.weight'] = lin_b.weight.detach()
    sd.update({f'vae.text.decoder.{k}': v for k, v in gpt.state_dict().items()})
    assert 'vae.text.decoder.lm_head.weight' in sd   # the tied copy, as in the real file
    sd['vae.text.decoder.transformer.linear.weight'] = lin.weight.detach()
    sd['vae.text.decoder.transformer.linear_emb.weight'] = lin_e.weight.detach()
    for i in range(LAYERS):  # the original's causal-mask buffers
        sd[f'vae.text.decoder.transformer.h.{i}.attn.bias'] = torch.tril(
            torch.ones(1024, 1024))[None, None]
    params = convert_checkpoint(sd, cfg)['vae_text']
    return dict(bert=bert, gpt=gpt, lin_b=lin_b, lin=lin, lin_e=lin_e, sd=sd, cfg=cfg,
                params=params, model=Optimus(cfg.vae.text))


def _max(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _bert_ids():
    ids = np.random.default_rng(0).integers(1000, 28000, (3, 12))
    ids[:, 0] = 101
    ids[0, -1] = 102
    ids[1, 7], ids[1, 8:] = 102, 0   # padded rows
    ids[2, 4], ids[2, 5:] = 102, 0
    return ids


def _hf_latent_logits(ref, ids, z):
    """Optimus' latent injection, built from transformers' GPT-2."""
    from transformers import DynamicCache
    gpt, b, t = ref['gpt'], ids.shape[0], ids.shape[1]
    with torch.no_grad():
        zt, it = torch.from_numpy(np.asarray(z)), torch.from_numpy(np.asarray(ids))
        mem = ref['lin'](zt).view(b, LAYERS, D)
        # one slot per layer, key = value = the layer's chunk, split into heads
        kv = [(mem[:, i].view(b, 1, HEADS, D // HEADS).transpose(1, 2),) * 2
              for i in range(LAYERS)]
        emb = gpt.transformer.wte(it) + ref['lin_e'](zt)[:, None]
        out = gpt(inputs_embeds=emb, past_key_values=DynamicCache(ddp_cache_data=kv),
                  position_ids=torch.arange(1, t + 1)[None].expand(b, -1),
                  attention_mask=torch.ones(b, 1 + t, dtype=torch.long))
    return out.logits.numpy()


# ----------------------------------------------------------------------------------------
# Numerical parity
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_encoder_parity(ref):
    ids = _bert_ids()
    model, params = ref['model'], ref['params']
    seq, pooled = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(ids > 0),
                              method=lambda m, i, a: m.encoder(i, a))
    with torch.no_grad():
        out = ref['bert'](torch.from_numpy(ids), attention_mask=torch.from_numpy((ids > 0) * 1))
        mu_ref = ref['lin_b'](out.pooler_output)[:, :LATENT].numpy()
    mu = encode_ids(model, params, ids)
    errs = dict(hidden=_max(seq, out.last_hidden_state), pooled=_max(pooled, out.pooler_output),
                mu=_max(mu, mu_ref))
    print('encoder max abs errors', errs)
    assert max(errs.values()) < TOL, errs
    assert mu.shape == (3, LATENT) and mu.dtype == jnp.float32
    # the padding really is masked: extra pad columns leave mu unchanged
    longer = np.concatenate([ids, np.zeros((3, 5), ids.dtype)], 1)
    assert _max(encode_ids(model, params, longer), mu) < 1e-5


@pytest.mark.slow
def test_decoder_parity_plain_gpt2(ref):
    ids = np.random.default_rng(1).integers(0, 50260, (2, 9))
    logits = ref['model'].apply({'params': ref['params']}, jnp.asarray(ids), None,
                                method=Optimus.decode_logits)
    with torch.no_grad():
        want = ref['gpt'](torch.from_numpy(ids)).logits.numpy()
    err = _max(logits, want)
    print('plain GPT-2 logits max abs error', err, 'max |logit|', np.abs(want).max())
    assert logits.shape == (2, 9, 50260) and err < TOL


@pytest.mark.slow
def test_latent_injection_and_kv_cache(ref):
    model, params = ref['model'], ref['params']
    ids = np.random.default_rng(2).integers(0, 50260, (2, 7))
    ids[:, 0] = BOS_ID
    z = np.random.default_rng(3).normal(size=(2, LATENT)).astype(np.float32)
    full = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(z),
                       method=Optimus.decode_logits)
    want = _hf_latent_logits(ref, ids, z)
    err = _max(full, want)
    print('latent-injected logits max abs error', err)
    assert err < TOL
    # the latent matters (a mistake that drops it would not pass the comparison above)
    assert _max(full, model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(z) + 1.0,
                                  method=Optimus.decode_logits)) > 0.1
    # one token at a time through the KV cache gives the same logits
    cache = model.apply({'params': params}, jnp.asarray(z), 10, method=Optimus.init_cache)
    step = jax.jit(lambda c, t: model.apply({'params': params}, t, c, method=Optimus.decode_step))
    steps = []
    for i in range(ids.shape[1]):
        lg, cache = step(cache, jnp.asarray(ids[:, i:i + 1]))
        steps.append(lg[:, 0])
    assert int(cache['index']) == 1 + ids.shape[1]
    err = _max(jnp.stack(steps, 1), want)
    print('KV-cache step logits max abs error', err)
    assert err < TOL


def _reference_greedy(ref, z, max_length):
    """The original's decode loop (re-run the whole prefix each step), argmax instead of
    multinomial, on the transformers reference."""
    out = []
    for zi in z:
        seq = [BOS_ID]
        while True:
            nxt = int(np.argmax(_hf_latent_logits(ref, np.array([seq]), zi[None])[0, -1]))
            seq.append(nxt)
            if nxt == EOS_ID:
                break
            if len(seq) >= max_length:
                seq[-1] = EOS_ID
                break
        out.append(seq)
    return out


@pytest.mark.slow
def test_greedy_and_beam_match_reference(ref):
    model, params = ref['model'], ref['params']
    z = np.random.default_rng(4).normal(size=(3, LATENT)).astype(np.float32)
    L = 10
    g = decode_ids(model, params, z, 'greedy', max_length=L)
    want = _reference_greedy(ref, z, L)
    for r, seq in enumerate(want):
        assert int(g.lengths[r]) == len(seq)
        np.testing.assert_array_equal(np.asarray(g.tokens)[r, :len(seq)], seq)
        assert np.all(np.asarray(g.tokens)[r, len(seq):] == PAD_ID)
    b1 = decode_ids(model, params, z, 'beam', beam_size=1, max_length=L)
    np.testing.assert_array_equal(np.asarray(b1.tokens), np.asarray(g.tokens))
    # one compiled program serves any batch of the same shape
    n = text_io._decode_jit._cache_size()
    decode_ids(model, params, z + 0.5, 'greedy', max_length=L)
    assert text_io._decode_jit._cache_size() == n
    b3 = decode_ids(model, params, z, 'beam', beam_size=3, max_length=L)
    assert b3.tokens.shape == (3, L) and np.all(np.asarray(b3.tokens)[:, 0] == BOS_ID)
    assert np.all(np.asarray(b3.tokens)[np.arange(3), np.asarray(b3.lengths) - 1] == EOS_ID)


@pytest.mark.slow
def test_sampling_keys(ref):
    model, params = ref['model'], ref['params']
    # same shapes as the greedy test above, so its compiled greedy program is reused
    z = np.random.default_rng(5).normal(size=(3, LATENT)).astype(np.float32)
    kw = dict(top_p=1.0, max_length=10)   # the original's settings (temperature 1)
    a = decode_ids(model, params, z, 'sample', key=jax.random.PRNGKey(0), **kw)
    b = decode_ids(model, params, z, 'sample', key=jax.random.PRNGKey(0), **kw)
    c = decode_ids(model, params, z, 'sample', key=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))
    # a vanishing nucleus keeps only the argmax: sampling becomes greedy
    s = decode_ids(model, params, z, 'sample', key=jax.random.PRNGKey(2), top_p=1e-9, max_length=10)
    g = decode_ids(model, params, z, 'greedy', max_length=10)
    np.testing.assert_array_equal(np.asarray(s.tokens), np.asarray(g.tokens))


# ----------------------------------------------------------------------------------------
# Full size and the real key list
# ----------------------------------------------------------------------------------------

def test_full_size_counts_and_fourflow_keys():
    counts = param_count(Optimus(optimus_cfg()))
    assert counts == {'encoder': 109_489_920, 'decoder': 132_109_824}, counts
    shapes = listing.shapes()
    text = {k for k in shapes if k.startswith('vae.text.')}
    assert len(text) == 363
    layout, plans, targets, _ = plan_conversion(ShapeSource(shapes, 'vd_keys_fourflow.tsv'),
                                                load_config('vd_four_flow'), parts=['vae_text'])
    assert layout.name == 'vd-v1.0'
    plan = plans['vae_text']
    ignored = {k for k, _ in plan.ignored}
    assert ignored == {f'vae.text.decoder.transformer.h.{i}.attn.bias' for i in range(12)}
    head = 'vae.text.decoder.lm_head.weight'
    assert plan.tied == [(head, 'vae.text.decoder.transformer.wte.weight')]
    assert {e.source_key for e in plan.entries} == text - ignored - {head}
    assert sum(int(np.prod(s)) for s in targets['vae_text'].values()) == 109_489_920 + 132_109_824
    path = {e.source_key[len('vae.text.'):]: e.path for e in plan.entries}
    assert path['encoder.encoder.layer.3.attention.self.query.weight'] == \
        'encoder/encoder/layer_3/attention/self/query/kernel'
    assert path['decoder.transformer.h.0.attn.c_attn.weight'] == \
        'decoder/transformer/h_0/attn/c_attn/kernel'
    assert path['decoder.transformer.linear.weight'] == 'decoder/transformer/linear/kernel'
    assert targets['vae_text']['decoder/transformer/linear/kernel'] == (768, 9216)
    assert targets['vae_text']['decoder/transformer/h_0/attn/c_attn/kernel'] == (768, 2304)


# ----------------------------------------------------------------------------------------
# Converter layouts and bad input
# ----------------------------------------------------------------------------------------

def test_standalone_optimus_layout(ref):
    """`optimus-vae.pth`: the same keys without `vae.text.`; detected as 'optimus' (not as
    kl-f8's `encoder.`/`decoder.`), converting to the same params."""
    sd = {k[len('vae.text.'):]: v for k, v in ref['sd'].items()}
    assert detect_layout(list(sd)).name == 'optimus'
    out = convert_checkpoint(sd, ref['cfg'])
    assert list(out) == ['vae_text']
    a, b = flatten(out['vae_text']), flatten(ref['params'])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    kl = ['encoder.conv_in.weight', 'decoder.conv_out.weight', 'quant_conv.weight',
          'encoder.mid.block_1.conv1.weight']
    assert detect_layout(kl).name == 'ldm-autokl'
    # layout of the real file: the key names of the TSV without the prefix
    keys = [k[len('vae.text.'):] for k in listing.shapes() if k.startswith('vae.text.')]
    assert detect_layout(keys).name == 'optimus'


def test_converter_errors(ref):
    sd, cfg = dict(ref['sd']), ref['cfg']
    missing = dict(sd)
    del missing['vae.text.encoder.encoder.layer.1.attention.self.key.weight']
    with pytest.raises(CheckpointError, match=r'encoder/encoder/layer_1/attention/self/key/kernel'):
        convert_checkpoint(missing, cfg)
    bad = dict(sd)
    bad['vae.text.decoder.transformer.linear_emb.weight'] = torch.zeros(D, LATENT + 1)
    with pytest.raises(CheckpointError,
                       match=r'vae\.text\.decoder\.transformer\.linear_emb\.weight: shape'):
        convert_checkpoint(bad, cfg)
    # c_attn is a Conv1D (in, out): a transposed (out, in) copy must be refused
    bad = dict(sd)
    bad['vae.text.decoder.transformer.h.0.attn.c_attn.weight'] = \
        sd['vae.text.decoder.transformer.h.0.attn.c_attn.weight'].T.contiguous()
    with pytest.raises(CheckpointError, match=r'h\.0\.attn\.c_attn\.weight: shape \(96, 32\)'):
        convert_checkpoint(bad, cfg)
    untied = dict(sd)
    untied['vae.text.decoder.lm_head.weight'] = sd['vae.text.decoder.lm_head.weight'] + 1
    with pytest.raises(CheckpointError, match=r'lm_head\.weight.*exact copy'):
        convert_checkpoint(untied, cfg)
    extra = dict(sd)
    extra['vae.text.decoder.transformer.h.0.attn.masked_bias'] = torch.tensor(-1e4)
    extra['vae.text.encoder.embeddings.position_ids'] = torch.arange(512)[None]
    with pytest.raises(CheckpointError, match=r'embeddings\.position_ids') as e:
        convert_checkpoint(extra, cfg)
    assert 'masked_bias' not in str(e.value)   # ignored by name


def test_bad_latent_and_arguments(ref):
    model, params = ref['model'], ref['params']
    with pytest.raises(ValueError, match=r'latent z must be \(B, 16\), got shape \(2, 15\)'):
        decode_ids(model, params, np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match=r'latent z must be'):
        model.apply({'params': params}, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 17)),
                    method=Optimus.decode_logits)
    with pytest.raises(ValueError, match='PRNG key'):
        decode_ids(model, params, np.zeros((1, LATENT), np.float32), 'sample')
    with pytest.raises(ValueError, match='method must be one of'):
        decode_ids(model, params, np.zeros((1, LATENT), np.float32), 'topk')
    with pytest.raises(ValueError, match='max_length'):
        decode_ids(model, params, np.zeros((1, LATENT), np.float32), max_length=1)
    with pytest.raises(ValueError, match='unknown key'):
        Optimus({**optimus_cfg(tiny=True), 'nz': 3}).config
    with pytest.raises(ValueError, match='list of strings'):
        tokenize_for_encoder('a sentence')


# ----------------------------------------------------------------------------------------
# String API (needs the bundled vocabularies of vd_jax.tokenizers)
# ----------------------------------------------------------------------------------------

def test_text_cleanup_like_the_original():
    from vd_jax.tokenizers import gpt2_tokenizer
    tok = gpt2_tokenizer()
    ids = [BOS_ID] + tok.encode(' a man riding a horse. i do not know') + [EOS_ID]
    # added tokens get a leading space (so the last word survives the drop of <EOS>), and
    # the original's clean-up turns " do not" into " don't"
    assert ids_to_text(ids, tok) == "a man riding a horse. i don't know"
    assert ids_to_text([BOS_ID, EOS_ID], tok) == ''
    assert remove_repeated_ngrams('a dog a dog on the grass grass') == 'a dog on the grass'
    # outputs of the original `remove_duplicate_word` (app.py) on the same inputs
    assert remove_repeated_ngrams('a cat, a cat, sits on (the) (the) mat.') == \
        'a cat, sits on (the) mat.'
    assert remove_repeated_ngrams('the the the cat') == 'the cat'
    assert remove_repeated_ngrams('') == ''


@pytest.mark.slow
def test_string_api(ref):
    model, params = ref['model'], ref['params']
    from vd_jax.tokenizers import bert_tokenizer
    bert = bert_tokenizer()
    ids = tokenize_for_encoder(['A Man riding a Horse.', 'x ' * 100], bert)
    assert ids.shape == (2, 79)
    # lower-cased before the cased vocabulary, as the original
    want = [101] + bert.convert_tokens_to_ids(bert.tokenize('a man riding a horse.')) + [102]
    np.testing.assert_array_equal(ids[0, :len(want)], want)
    assert np.all(ids[0, len(want):] == 0)
    assert ids[1, 78] == 102 and np.all(ids[1, 1:78] > 0)   # truncated to 77 word pieces
    mu = encode_text(model, params, ['A Man riding a Horse.', 'x ' * 100])
    np.testing.assert_array_equal(np.asarray(mu), np.asarray(encode_ids(model, params, ids)))
    texts = decode_latent(model, params, mu, 'greedy', max_length=8)
    g = decode_ids(model, params, mu, 'greedy', max_length=8)
    assert texts == [ids_to_text(np.asarray(g.tokens)[i, :int(g.lengths[i])]) for i in range(2)]
    # (a first token without a leading space glues onto ' <BOS>' and is dropped with it,
    # as in the original, so a random-weight sentence may come out empty)
    assert all(isinstance(t, str) for t in texts) and any(texts)
    dedup = decode_latent(model, params, mu, 'greedy', max_length=8, remove_duplicates=True)
    assert dedup == [remove_repeated_ngrams(t) for t in texts]
    # one key per row: a row's sample does not depend on the rest of the batch; `seeds`
    # is the shortcut for these keys
    keys = jax.vmap(jax.random.PRNGKey)(jnp.array([7, 8], jnp.uint32))
    both = decode_ids(model, params, mu, 'sample', key=keys, max_length=8)
    one = decode_ids(model, params, mu[1:], 'sample', key=keys[1:], max_length=8)
    np.testing.assert_array_equal(np.asarray(both.tokens)[1], np.asarray(one.tokens)[0])
    texts = decode_latent(model, params, mu, 'sample', seeds=[7, 8], max_length=8)
    tokens, lengths = np.asarray(both.tokens), np.asarray(both.lengths)
    assert texts == [ids_to_text(tokens[i, :lengths[i]]) for i in range(2)]
