"""Text through the Optimus VAE: sentences -> latents -> sentences, as VD does it.

  tokenize_for_encoder / encode_text   sentences -> BERT ids -> mu (`optimus_vae_next.encode`:
                                       lower-cased input into the *cased* WordPiece vocabulary,
                                       a quirk of the original its weights were trained with)
  decode_ids / decode_latent           latents -> GPT-2 ids (jitted KV-cache greedy, sampling
                                       or beam search, `vd_jax.decoding`) -> text, turned into
                                       strings the way the original tokenizer did (`ids_to_text`)
  remove_repeated_ngrams               the v1.0 demo's clean-up of decoded sentences

Every special token id and length limit comes from the model's `OptimusConfig`, so a model
trained with other vocabularies decodes correctly; `check_vocabularies` refuses tokenizers
whose vocabulary does not fit the model.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import decoding
from vd_jax.models.optimus import PAD_ID, Optimus, OptimusConfig
from vd_jax.tokenizers import bert_tokenizer, bytes_to_unicode, gpt2_tokenizer


# ----------------------------------------------------------------------------------------
# Functional numeric API (jitted)
# ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('model',))
def _encode_jit(model, params, input_ids):
    return model.apply({'params': params}, input_ids, method=Optimus.encode)[0] * model.latent_scale


def encode_ids(model: Optimus, params, input_ids):
    """VD's text `vae_encode` on token ids: BERT ids (B, L) int (pad 0) -> latent_scale x mu
    (B, latent) (the scale is 1 for the released model)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f'input_ids must be (B, L) ints, got shape {input_ids.shape}')
    return _encode_jit(model, params, input_ids)


METHODS = ('greedy', 'sample', 'beam')


@functools.partial(jax.jit, static_argnames=(
    'model', 'method', 'max_length', 'top_k', 'top_p', 'beam_size', 'length_penalty',
    'early_stopping'))
def _decode_jit(model, params, z, key, temperature, *, method, max_length, top_k, top_p,
                beam_size, length_penalty, early_stopping):
    variables = {'params': params}
    # slot 0 = memory, then one slot per fed token (the last token is never fed)
    cache = model.apply(variables, z, max_length, method=Optimus.init_cache)

    def step_fn(last, cache):
        logits, cache = model.apply(variables, last[:, None], cache, method=Optimus.decode_step)
        return logits[:, -1], cache

    c = model.config
    start = jnp.full((z.shape[0],), c.bos_id, jnp.int32)
    kw = dict(eos_id=c.eos_id, pad_id=c.pad_id, max_length=max_length)
    if method == 'greedy':
        return decoding.greedy_search(step_fn, cache, start, **kw)
    if method == 'sample':
        return decoding.sample(step_fn, cache, start, key, temperature=temperature, top_k=top_k,
                               top_p=top_p, **kw)
    return decoding.beam_search(step_fn, cache, start, beam_size=beam_size,
                                length_penalty=length_penalty, early_stopping=early_stopping, **kw)


def decode_ids(model: Optimus, params, z, method: str = 'greedy', *, key=None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               beam_size: int = 4, length_penalty: float = 1.0, early_stopping: bool = True,
               max_length: Optional[int] = None) -> decoding.DecodeOutput:
    """VD's text `vae_decode` on latents: z (B, latent) -> generated GPT-2 ids.

    Every row starts with <BOS>; decoding stops at <EOS> or at `max_length` tokens (default
    the config's 30, counted as the original: <BOS> and <EOS> included, the 30th token
    forced to <EOS>). One jitted program per (shape, method, static options).

    Args:
      method: 'greedy' | 'sample' (the original's choice: multinomial, temperature 1, no
        filtering -- pass top_p=1.0 for its nucleus step, which drops the same ~1e-7 tail up
        to float32 summation order) | 'beam'.
      key: PRNG key, or one key per row (a row then depends only on its own key), required
        for 'sample'.
      temperature, top_k, top_p: sampling options (see `vd_jax.decoding.sample`).
      beam_size, length_penalty, early_stopping: beam options (see `decoding.beam_search`).
    Returns:
      `decoding.DecodeOutput(tokens (B, max_length), lengths (B,), scores (B,))`,
      tokens padded with <PAD> = 50257 after <EOS>.
    """
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    z = jnp.asarray(z)
    latent = model.config.latent_size
    if z.ndim != 2 or z.shape[1] != latent:
        raise ValueError(f'latent z must be (B, {latent}), got shape {tuple(z.shape)}')
    if method == 'sample' and key is None:
        raise ValueError("method='sample' needs a PRNG key (key=jax.random.key(seed))")
    if method == 'sample' and isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    max_length = model.config.max_length if max_length is None else int(max_length)
    if not 2 <= max_length <= model.config.decoder.n_positions:
        raise ValueError(f'max_length must be in [2, {model.config.decoder.n_positions}], '
                         f'got {max_length}')
    if key is None:
        key = jax.random.PRNGKey(0)  # unused by greedy / beam
    z = z.astype(jnp.float32) / model.latent_scale  # VD latents -> the network's
    return _decode_jit(model, params, z, key,
                       jnp.asarray(temperature, jnp.float32), method=method,
                       max_length=max_length, top_k=int(top_k), top_p=float(top_p),
                       beam_size=int(beam_size), length_penalty=float(length_penalty),
                       early_stopping=bool(early_stopping))


# ----------------------------------------------------------------------------------------
# String API
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _default_tokenizers():
    return bert_tokenizer(), gpt2_tokenizer()


def check_vocabularies(config: OptimusConfig, bert=None, gpt2=None) -> None:
    """Refuse tokenizers whose ids do not fit the model (a tokenizer for another model would
    otherwise index past the embedding tables or decode the wrong words).

    Checks that every id a tokenizer can produce is below the matching tower's vocab_size
    and that the GPT-2 tokenizer knows the special ids of the config.
    """
    for name, tok, tower in (('BERT (encoder)', bert, config.encoder),
                             ('GPT-2 (decoder)', gpt2, config.decoder)):
        if tok is None:
            continue
        n = len(tok)
        if n > tower.vocab_size:
            raise ValueError(f'the {name} tokenizer has {n} tokens but the Optimus model\'s '
                             f'vocabulary has {tower.vocab_size}: tokenizer and model do not '
                             'belong together (give the vocabulary files the model was trained '
                             'with)')
    if gpt2 is not None:
        for k in ('pad_id', 'bos_id', 'eos_id'):
            if getattr(config, k) >= len(gpt2):
                raise ValueError(f'Optimus config {k}={getattr(config, k)} is not a token of the '
                                 f'GPT-2 tokenizer ({len(gpt2)} tokens)')


def tokenize_for_encoder(sentences: Sequence[str], tokenizer=None,
                         config: Optional[OptimusConfig] = None) -> np.ndarray:
    """Sentences -> BERT ids (B, max_wordpieces + 2) int32, as `optimus_vae_next.encode`:
    `tokenize(sentence.lower())` (lower-cased input into the *cased* vocabulary, a quirk
    of the original that its weights were trained with), truncated to `max_wordpieces` (77)
    word pieces, `[CLS] ... [SEP]`, padded with [PAD] (ids and lengths from `config`,
    default the released model's).

    The original pads to the longest sentence of the batch; we pad to the fixed maximum so
    one compiled encoder serves every batch. Padded keys are masked, so mu is the same up
    to float summation order.
    """
    if isinstance(sentences, str):
        raise ValueError('sentences must be a list of strings, got a single str '
                         '(wrap it: [sentence])')
    c = config or OptimusConfig()
    tok = tokenizer if tokenizer is not None else _default_tokenizers()[0]
    ids = np.full((len(sentences), c.max_wordpieces + 2), c.bert_pad_id, np.int32)
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise ValueError(f'sentences[{i}] is {type(s).__name__}, not str')
        pieces = tok.convert_tokens_to_ids(tok.tokenize(s.lower())[:c.max_wordpieces])
        row = [c.bert_cls_id] + list(pieces) + [c.bert_sep_id]
        ids[i, :len(row)] = row
    return ids


def encode_text(model: Optimus, params, sentences: Sequence[str], tokenizer=None):
    """VD's `vae_encode(text, which='text')`: list of B sentences -> mu (B, latent) float32."""
    return encode_ids(model, params, tokenize_for_encoder(sentences, tokenizer, model.config))


def _clean_up_tokenization(text: str) -> str:
    """The original tokenizer's `clean_up_tokenization` (pytorch-transformers 1.x): glue
    punctuation and English contractions. Note the " do not" -> " don't" rule, which
    current transformers dropped."""
    for a, b in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (' do not', " don't"), (" 's", "'s"),
                 (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@functools.lru_cache(maxsize=None)
def _byte_decoder():
    return {u: b for b, u in bytes_to_unicode().items()}


def ids_to_text(ids: Sequence[int], tokenizer=None, first_added_id: int = PAD_ID) -> str:
    """One decoded row (<BOS> ... <EOS>) -> text, exactly as `optimus_vae_next.decode`:
    the original tokenizer's `decode(..., clean_up_tokenization_spaces=True)` (added
    tokens <PAD>/<BOS>/<EOS> each become ' ' + token, byte-level BPE runs are decoded in
    between, errors='replace'), then whitespace split, dropping the first and last word.

    Current transformers glues added tokens differently ('...horse.<EOS>'), which would
    make the last-word drop eat a real word, hence this re-implementation.
    first_added_id: the first of Optimus' added tokens (<PAD>, then <BOS>, <EOS>) = the
    config's `pad_id`.
    """
    tok = tokenizer if tokenizer is not None else _default_tokenizers()[1]
    dec = _byte_decoder()
    pieces, run = [], []

    def flush():
        if run:
            data = bytes(dec[ch] for t in run for ch in t)
            pieces.append(data.decode('utf-8', errors='replace'))
            run.clear()
    for i in ids:
        i = int(i)
        token = tok.convert_ids_to_tokens(i)
        if i >= first_added_id:      # Optimus' added tokens
            flush()
            pieces.append(' ' + token)
        else:
            run.append(token)
    flush()
    words = _clean_up_tokenization(''.join(pieces)).split()
    return ' '.join(words[1:-1])


# Punctuation that `remove_duplicate_word` (app.py) splits off words before matching.
_OPENERS = '([{'
_CLOSERS = '?!.,:;}])'
_GLUE = '<puncnext>'


def _split_punctuation(text: str) -> List[str]:
    """Words, with leading '([{' and trailing '?!.,:;}])' characters split off, each joined
    to its word by a `<puncnext>` marker ('(a,' -> '(', M, 'a', M, ',')."""
    out = []
    for word in text.split(' '):
        if not word:
            continue  # the original would crash on an empty word (double space)
        lead = 0
        while lead < len(word) and word[lead] in _OPENERS:
            lead += 1
        for ch in word[:lead]:
            out += [ch, _GLUE]
        core = word[lead:]
        trail = len(core)
        while trail > 0 and core[trail - 1] in _CLOSERS:
            trail -= 1
        if core[:trail]:
            out.append(core[:trail])
        for ch in core[trail:]:
            out += [_GLUE, ch]
    return out


def remove_repeated_ngrams(text: str) -> str:
    """The v1.0 demo's `remove_duplicate_word` (app.py:129-201), same procedure.

    With n = 1, 2, 3, ...: the text is viewed as its overlapping n-grams; while some n-gram
    is immediately repeated (n-gram i equals n-gram i+n), the n n-grams after i are
    dropped (scan restarts); then every n-gram is extended by the last word of its right
    neighbour. Ends when one n-gram (the de-duplicated text) remains. So 'a dog a dog on
    the grass grass' -> 'a dog on the grass'.
    """
    if text == '':
        return text
    grams = [(w,) for w in _split_punctuation(text)]
    n = 1
    while len(grams) > 1:
        found = True
        while found:
            found = False
            for i in range(len(grams) - n):
                if grams[i] == grams[i + n]:
                    del grams[i + 1:i + n + 1]
                    found = True
                    break
        if len(grams) > 1:
            grams = [grams[i] + (grams[i + 1][-1],) for i in range(len(grams) - 1)]
            n += 1
    out = ' '.join(grams[0]) if grams else ''
    return out.replace(f' {_GLUE} ', '')


def decode_latent(model: Optimus, params, z, method: str = 'greedy', *, key=None,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  beam_size: int = 4, length_penalty: float = 1.0, early_stopping: bool = True,
                  max_length: Optional[int] = None, remove_duplicates: bool = False,
                  seeds: Optional[Sequence[int]] = None, tokenizer=None) -> List[str]:
    """VD's `vae_decode(z, which='text')`: latents (B, latent) -> B sentences.

    Options as `decode_ids` (the original samples: method='sample', temperature 1,
    top_p=1.0); `seeds` (B ints) is a shortcut for one key per row, `PRNGKey(seeds[i])`.
    `remove_duplicates` applies the v1.0 demo's repeated-n-gram removal
    (`remove_repeated_ngrams`), which the demo runs on every decoded sentence.
    """
    if seeds is not None:
        if key is not None:
            raise ValueError('give either key or seeds, not both')
        key = jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seeds, np.uint32)))
    out = decode_ids(model, params, z, method, key=key, temperature=temperature, top_k=top_k,
                     top_p=top_p, beam_size=beam_size, length_penalty=length_penalty,
                     early_stopping=early_stopping, max_length=max_length)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [ids_to_text(tokens[i, :lengths[i]], tokenizer, model.config.pad_id)
             for i in range(tokens.shape[0])]
    return [remove_repeated_ngrams(t) for t in texts] if remove_duplicates else texts
