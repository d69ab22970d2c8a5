"""Offline tokenizers: bundled vocabularies, known ids, independent references, bad input.

References, computed independently of `vd_jax.tokenizers`:
  * hand-verified ids: CLIP "a photo of a cat" -> 49406 320 1125 539 320 2368 49407,
    GPT-2 "Hello world" -> 15496 995, BERT-cased "Hello world" -> 101 8667 1362 102;
  * CLIP and GPT-2: a small pure-Python byte-level BPE written here (the published
    algorithms: regex pre-split, byte -> unicode table, lowest-rank merge first) must give
    the ids of transformers' Rust tokenizers built from our files on varied sentences;
  * BERT: transformers' slow Python `BertTokenizerLegacy` vs the fast `BertTokenizer`;
  * provenance: the sha256 of every decompressed vocabulary file equals the one recorded in
    `vd_jax/vocab/README.md` (the GPT-2 and BERT ones are the well-known originals').
"""
import gzip
import hashlib
import json
import os
import re
import socket

import numpy as np
import pytest
import regex

from vd_jax import tokenizers as T
from vd_jax.errors import CheckpointError

SENTENCES = [
    'a photo of a cat',
    'A Photo of  a CAT, sitting on the mat!',
    "it's 2024 and we've got 3.5 apples; they're 100% fresh...",
    'Café crème brûlée — naïve façade (über-cool) #hashtag @user',
    'an astronaut riding a horse on the moon, 4k, trending on artstation',
    'emoji 🐱🚀 and 日本語 text',
    '',
]


# ----------------------------------------------------------------------------------------
# Independent byte-level BPE (reference)
# ----------------------------------------------------------------------------------------

def _byte_symbols():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    other = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(other)}}


def _bpe(word, ranks):
    """Merge the lowest-ranked adjacent pair until none is in `ranks`."""
    word = list(word)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), float('inf')), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == float('inf'):
            break
        a, b = word[i], word[i + 1]
        out, j = [], 0
        while j < len(word):  # merge every occurrence of (a, b), left to right
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(word[j])
                j += 1
        word = out
    return word


def _read_gz(name):
    with gzip.open(os.path.join(T.VOCAB_DIR, name), 'rt', encoding='utf-8') as f:
        return f.read()


@pytest.fixture(scope='module')
def clip_ref():
    merges = [tuple(l.split()) for l in _read_gz('clip_merges.txt.gz').split('\n')[1:] if l]
    sym = _byte_symbols()
    tokens = list(sym.values()) + [s + '</w>' for s in sym.values()] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(tokens + ['<|startoftext|>', '<|endoftext|>'])}
    ranks = {m: i for i, m in enumerate(merges)}
    pat = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                        r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    def encode(text):
        text = re.sub(r'\s+', ' ', text).strip().lower()
        ids = [49406]
        for piece in pat.findall(text):
            chars = [sym[b] for b in piece.encode('utf-8')]
            chars[-1] += '</w>'
            ids += [vocab[t] for t in _bpe(chars, ranks)]
        return ids + [49407]
    return vocab, encode


@pytest.fixture(scope='module')
def gpt2_ref():
    enc = json.loads(_read_gz('gpt2_encoder.json.gz'))
    merges = [tuple(l.split()) for l in _read_gz('gpt2_vocab.bpe.gz').split('\n')[1:] if l]
    ranks = {m: i for i, m in enumerate(merges)}
    sym = _byte_symbols()
    pat = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def encode(text):
        return [enc[t] for piece in pat.findall(text)
                for t in _bpe([sym[b] for b in piece.encode('utf-8')], ranks)]
    return encode


# ----------------------------------------------------------------------------------------
# Offline and provenance
# ----------------------------------------------------------------------------------------

def test_loading_needs_no_network(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError(f'network/hub access attempted: {a[:2]}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    for name in ('hf_hub_download', 'snapshot_download'):
        monkeypatch.setattr(huggingface_hub, name, refuse)
        monkeypatch.setattr(huggingface_hub.file_download, name, refuse, raising=False)
    assert os.environ.get('HF_HUB_OFFLINE') == '1'
    T._clip_cached.cache_clear()
    assert len(T.clip_tokenizer()) == 49408
    assert len(T.bert_tokenizer()) == 28996
    assert len(T.gpt2_tokenizer()) == 50260


def test_vocab_files_match_readme():
    readme = open(os.path.join(T.VOCAB_DIR, 'README.md')).read()
    files = sorted(f for f in os.listdir(T.VOCAB_DIR) if f.endswith('.gz'))
    assert files == ['bert_base_cased_vocab.txt.gz', 'clip_merges.txt.gz', 'clip_vocab.json.gz',
                     'gpt2_encoder.json.gz', 'gpt2_vocab.bpe.gz']
    for f in files:
        digest = hashlib.sha256(_read_gz(f).encode('utf-8')).hexdigest()
        row = next(l for l in readme.splitlines() if f'`{f}`' in l)
        assert digest in row, (f, digest)
    for lic in ('LICENSE-CLIP.txt', 'LICENSE-GPT2.txt', 'LICENSE-BERT.txt'):
        assert os.path.getsize(os.path.join(T.VOCAB_DIR, lic)) > 500
    total = sum(os.path.getsize(os.path.join(T.VOCAB_DIR, f)) for f in files)
    assert total < 2_000_000, total  # "a few MB" at most; 1.2 MB today


# ----------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------

def test_clip_known_ids_and_padding():
    tok = T.clip_tokenizer()
    ids = tok(['a photo of a cat', ''])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()                       # EOT doubles as padding
    assert ids[1].tolist() == [49406] + [49407] * 76          # "" is VD's unconditional prompt
    assert tok('a photo of a cat').shape == (1, 77)


def test_clip_vocab_and_ids_equal_reference_bpe(clip_ref):
    vocab, encode = clip_ref
    shipped = json.loads(_read_gz('clip_vocab.json.gz'))
    assert shipped == vocab and len(vocab) == 49408
    tok = T.clip_tokenizer()
    for s in SENTENCES:
        ref = encode(s)
        got = tok(s)[0]
        assert got[:len(ref)].tolist() == ref, s
        assert (got[len(ref):] == 49407).all()


def test_clip_truncation_warns_and_bad_prompts():
    tok = T.clip_tokenizer()
    fits = ' '.join(['cat'] * 75)  # 75 BPE tokens + BOS + EOT = 77: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert tok(fits)[0, -1] == 49407
    with pytest.warns(UserWarning, match=r'prompt 1 has 100 BPE tokens.*truncated'):
        ids = tok(['ok', ' '.join(['dog'] * 100)])
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:76] == ids[1, 1]).all()
    with pytest.raises(TypeError, match=r'every prompt must be a string.*\(1, .NoneType.\)'):
        tok(['fine', None])
    with pytest.raises(TypeError, match='got int'):
        tok(3)
    with pytest.raises(ValueError, match='prompts is empty'):
        tok([])


def test_clip_user_files(tmp_path, clip_ref):
    """A folder with vocab.json + merges.txt (hub names), or OpenAI's bpe_simple_vocab file."""
    (tmp_path / 'vocab.json').write_text(_read_gz('clip_vocab.json.gz'), encoding='utf-8')
    (tmp_path / 'merges.txt').write_text(_read_gz('clip_merges.txt.gz'), encoding='utf-8')
    s = SENTENCES[2]
    want = T.clip_tokenizer()(s)
    np.testing.assert_array_equal(T.clip_tokenizer(str(tmp_path))(s), want)
    bpe = tmp_path / 'bpe_simple_vocab_16e6.txt.gz'
    merges = _read_gz('clip_merges.txt.gz').split('\n')[1:]
    with gzip.open(bpe, 'wt', encoding='utf-8') as f:  # OpenAI's header line, then merges
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + '\n'.join(merges))
    np.testing.assert_array_equal(T.clip_tokenizer(str(bpe))(s), want)
    with pytest.raises(CheckpointError, match='no CLIP merges.txt'):
        os.remove(tmp_path / 'merges.txt')
        T.clip_tokenizer(str(tmp_path))
    with pytest.raises(CheckpointError, match='does not exist'):
        T.clip_tokenizer(str(tmp_path / 'nowhere'))


# ----------------------------------------------------------------------------------------
# BERT and GPT-2 (Optimus)
# ----------------------------------------------------------------------------------------

def test_bert_cased(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    tok = T.bert_tokenizer()
    assert len(tok) == 28996
    assert tok('Hello world')['input_ids'] == [101, 8667, 1362, 102]
    assert tok('hello')['input_ids'] != tok('Hello')['input_ids']  # cased
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id) == (101, 102, 0, 100)
    path = tmp_path / 'vocab.txt'
    path.write_text(_read_gz('bert_base_cased_vocab.txt.gz'), encoding='utf-8')
    slow = BertTokenizerLegacy(str(path), do_lower_case=False)
    mine = T.bert_tokenizer(str(tmp_path))  # a folder with vocab.txt
    for s in SENTENCES:
        assert tok(s)['input_ids'] == slow(s)['input_ids'] == mine(s)['input_ids'], s
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointError, match='no BERT vocab.txt'):
        T.bert_tokenizer(str(tmp_path / 'empty'))


def test_gpt2_with_optimus_tokens(gpt2_ref, tmp_path):
    tok = T.gpt2_tokenizer()
    assert len(tok) == 50260
    assert tok('Hello world')['input_ids'] == [15496, 995]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (50257, 50258, 50259)
    assert tok.convert_ids_to_tokens([50257, 50258, 50259]) == ['<PAD>', '<BOS>', '<EOS>']
    for s in SENTENCES + [' leading space', 'two  spaces\nand a newline']:
        assert tok(s)['input_ids'] == gpt2_ref(s), s
    (tmp_path / 'vocab.json').write_text(_read_gz('gpt2_encoder.json.gz'), encoding='utf-8')
    (tmp_path / 'merges.txt').write_text(_read_gz('gpt2_vocab.bpe.gz'), encoding='utf-8')
    assert T.gpt2_tokenizer(str(tmp_path))(SENTENCES[3])['input_ids'] == gpt2_ref(SENTENCES[3])
    with pytest.raises(CheckpointError, match='not a folder'):
        T.gpt2_tokenizer(str(tmp_path / 'vocab.json'))
