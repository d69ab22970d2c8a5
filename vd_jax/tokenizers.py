"""Offline tokenizers: CLIP BPE (context encoder), BERT-base-cased and GPT-2 (Optimus).

All three are transformers' own tokenizer classes built from vocabulary files that ship in
`vd_jax/vocab/` (provenance, hashes and licences in `vd_jax/vocab/README.md`), so nothing is
ever fetched from the model hub. Every constructor takes an optional `path` to use your own
files instead (a folder or a single file, see each function).

    ids = clip_tokenizer()(['a photo of a cat', ''])   # (2, 77) int32, EOT-padded
    bert = bert_tokenizer()                              # transformers BertTokenizer, cased
    gpt2 = gpt2_tokenizer()                              # GPT2Tokenizer + <PAD>/<BOS>/<EOS>
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vd_jax.errors import CheckpointError

VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab')

# openai/clip-vit-large-patch14: 49,408 ids, <|startoftext|> = 49406, <|endoftext|> = 49407 is
# both EOT and the padding token; every prompt becomes exactly 77 ids.
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77
# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of bpe_simple_vocab_16e6.
CLIP_NUM_MERGES = 49152 - 256 - 2
BERT_VOCAB_SIZE = 28996
GPT2_VOCAB_SIZE = 50257
# Optimus adds these to GPT-2 in this order (optimus.py:30-34): ids 50257, 50258, 50259.
GPT2_SPECIAL_TOKENS = (('pad_token', '<PAD>'), ('bos_token', '<BOS>'), ('eos_token', '<EOS>'))


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than CLIP's context: its end is dropped."""


def truncation_message(name: str, tokens: int, max_length: int, prompt: str) -> str:
    """'<name> has <tokens> BPE tokens; CLIP takes at most ...': one definition for the
    tokenizer's warning and the command line's check of the user's prompts."""
    keep = max_length - 2  # <|startoftext|> and <|endoftext|> take two of the places
    return (f'{name} has {tokens} BPE tokens; CLIP takes at most {keep}, so it is truncated '
            f'(the last {tokens - keep} are dropped): {prompt[:60]!r}...')


# ----------------------------------------------------------------------------------------
# File helpers
# ----------------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    """Read a UTF-8 text file, transparently gunzipping `*.gz`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"vocabulary file '{path}' does not exist")
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rt', encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read vocabulary file '{path}': {e}") from None


def _read_json(path: str) -> dict:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None


def _find(folder: str, names: Sequence[str], what: str) -> str:
    """The first of `names` (each also tried with '.gz') inside `folder`."""
    for n in names:
        for cand in (n, n + '.gz'):
            p = os.path.join(folder, cand)
            if os.path.isfile(p):
                return p
    raise CheckpointError(f"no {what} in '{folder}': expected one of "
                          f"{[n for n in names]} (optionally gzipped)")


def _merges_from_text(text: str, path: str) -> List[Tuple[str, str]]:
    """BPE merges file -> list of pairs (skips the '#version' header and blank lines)."""
    merges = []
    for i, line in enumerate(text.split('\n')):
        if not line or (i == 0 and line.startswith('#version')):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise CheckpointError(f"'{path}' line {i + 1} is not a BPE merge 'a b': {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


# ----------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------

def bytes_to_unicode() -> Dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to
    code points 256, 257, ... (so every byte has a visible, non-space stand-in). The dict
    order matters: the printable bytes first, then the others; CLIP's first 256 ids follow it.
    """
    keep = [b for b in range(256)
            if ord('!') <= b <= ord('~') or ord('¡') <= b <= ord('¬') or ord('®') <= b <= ord('ÿ')]
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def clip_vocab_from_bpe(bpe_text: str) -> Tuple[Dict[str, int], List[str]]:
    """OpenAI's `bpe_simple_vocab_16e6.txt` -> (vocab token->id, merges as 'a b' lines).

    The vocabulary is built as OpenAI's SimpleTokenizer builds it: the 256 byte symbols, the
    same with the end-of-word marker '</w>', one token per merge (the first 48,894 merges
    after the header line), then <|startoftext|> and <|endoftext|>: 49,408 ids.
    """
    lines = bpe_text.split('\n')
    merges = lines[1:1 + CLIP_NUM_MERGES]
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise CheckpointError(f'not a CLIP bpe_simple_vocab file: expected a header and '
                              f'{CLIP_NUM_MERGES} merge lines "a b"')
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + '</w>' for s in symbols] + [''.join(m.split()) for m in merges]
    tokens += ['<|startoftext|>', '<|endoftext|>']
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_files(path: Optional[str]):
    if path is None:
        return (_read_json(os.path.join(VOCAB_DIR, 'clip_vocab.json.gz')),
                _merges_from_text(_read_text(os.path.join(VOCAB_DIR, 'clip_merges.txt.gz')),
                                  'clip_merges.txt.gz'))
    if os.path.isdir(path):
        vpath = _find(path, ('vocab.json', 'clip_vocab.json'), 'CLIP vocab.json')
        mpath = _find(path, ('merges.txt', 'clip_merges.txt'), 'CLIP merges.txt')
        return _read_json(vpath), _merges_from_text(_read_text(mpath), mpath)
    if os.path.isfile(path):  # OpenAI's bpe_simple_vocab_16e6.txt(.gz)
        vocab, merges = clip_vocab_from_bpe(_read_text(path))
        return vocab, [tuple(m.split()) for m in merges]
    raise CheckpointError(f"CLIP vocabulary path '{path}' does not exist (give a folder with "
                          "vocab.json + merges.txt, or OpenAI's bpe_simple_vocab_16e6.txt.gz)")


class CLIPPromptTokenizer:
    """Prompts -> (B, 77) int32 ids as VD's text context encoder tokenizes them.

    `CLIPTokenizer(..., padding='max_length', max_length=77, truncation=True)` with the
    openai/clip-vit-large-patch14 conventions: <|startoftext|> (49406) + BPE ids +
    <|endoftext|> (49407), padded with 49407. An over-long prompt keeps its first 75 BPE
    tokens and ends in EOT, with a warning. "" is a legal prompt (VD's unconditional
    context): [49406, 49407, 49407, ...].

    Text is NFC-normalised, whitespace-collapsed and lower-cased (transformers' CLIP
    normaliser); OpenAI's SimpleTokenizer additionally runs ftfy and HTML-unescaping, so ids
    can differ only for text with mojibake or HTML entities.

    Attributes:
      tokenizer: the underlying `transformers.CLIPTokenizer`.
    """

    def __init__(self, tokenizer, max_length: int = CLIP_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self):
        return len(self.tokenizer)

    def truncated(self, prompts: Sequence[str]) -> List[Tuple[int, int]]:
        """(index, BPE tokens) of each distinct prompt longer than the model takes, at its
        first index: a prompt repeated (e.g. once per sample) is reported once."""
        if not prompts:
            return []
        full = self.tokenizer(list(prompts), add_special_tokens=True, verbose=False)['input_ids']
        out, seen = [], set()
        for i, ids in enumerate(full):
            if len(ids) > self.max_length and prompts[i] not in seen:
                seen.add(prompts[i])
                out.append((i, len(ids) - 2))
        return out

    def __call__(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
        """prompts: a string or a sequence of strings -> int32 ids (B, max_length). An
        over-long prompt is truncated with a `PromptTruncatedWarning` naming its index in
        `prompts` (once per distinct prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f'prompts must be a string or a list of strings, got '
                            f'{type(prompts).__name__}')
        if not prompts:
            raise ValueError('prompts is empty: give at least one prompt ("" is the '
                             'unconditional one)')
        bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f'every prompt must be a string; got {bad[:5]} (index, type)')
        for i, tokens in self.truncated(prompts):
            warnings.warn(truncation_message(f'prompt {i}', tokens, self.max_length, prompts[i]),
                          PromptTruncatedWarning, stacklevel=2)
        out = self.tokenizer(list(prompts), padding='max_length', max_length=self.max_length,
                             truncation=True)['input_ids']
        return np.asarray(out, dtype=np.int32)


def _clip_build(path):
    # lazy: transformers, PIL, tqdm (+0.5 s)
    from transformers import CLIPTokenizer  # noqa: PLC0415
    vocab, merges = _clip_files(path)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise CheckpointError(f'CLIP vocabulary has {len(vocab)} tokens, expected '
                              f'{CLIP_VOCAB_SIZE} (openai/clip-vit-large-patch14)')
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (CLIP_BOS_ID, CLIP_EOS_ID,
                                                                  CLIP_EOS_ID):
        raise CheckpointError(f'CLIP special tokens have ids {tok.bos_token_id}, '
                              f'{tok.eos_token_id}, {tok.pad_token_id}; expected '
                              f'{CLIP_BOS_ID}, {CLIP_EOS_ID}, {CLIP_EOS_ID}')
    return tok


@functools.lru_cache(maxsize=1)
def _clip_cached():
    # the bundled files never change: build once per process (about 1 s)
    return _clip_build(None)


def clip_tokenizer(path: Optional[str] = None) -> CLIPPromptTokenizer:
    """The CLIP ViT-L/14 tokenizer (49,408 ids), padding/truncating to 77.

    Args:
      path: None for the bundled vocabulary; or a folder holding `vocab.json` and
        `merges.txt` (e.g. a local copy of the hub repo's tokenizer files); or OpenAI's
        `bpe_simple_vocab_16e6.txt[.gz]`.
    """
    return CLIPPromptTokenizer(_clip_cached() if path is None else _clip_build(os.path.abspath(path)))


def _is_array(x) -> bool:
    """A numpy or jax array (duck-typed: this module does not import jax); numpy scalars are
    not arrays here."""
    return isinstance(x, np.ndarray) or (
        hasattr(x, '__array__') and hasattr(x, 'shape') and hasattr(x, 'dtype')
        and not isinstance(x, np.generic))


def token_ids(prompts) -> Optional[np.ndarray]:
    """Prompts given as CLIP token ids -> (P, L) int array; None for strings (or None).

    Token ids are an integer array (P, L) or (L,), or a list of equal-length integer
    sequences. Raises ValueError for a non-integer array, a mix of strings and ids, or ids of
    unequal lengths."""
    if isinstance(prompts, str) or prompts is None:
        return None
    if _is_array(prompts):
        a = np.asarray(prompts)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f'prompts given as an array must be integer CLIP token ids, got '
                             f'dtype {a.dtype}')
        return a[None] if a.ndim == 1 else a
    items = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
    seqs = [x for x in items if isinstance(x, (list, tuple)) or _is_array(x)]
    if not seqs:
        return None
    if len(seqs) != len(items) or not all(
            np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) == 1 for x in seqs):
        raise ValueError('prompts must be strings or CLIP token ids (integer sequences of '
                         'equal length), not a mix')
    if len({len(x) for x in seqs}) > 1:
        raise ValueError('token-id prompts must have equal lengths, got '
                         f'{sorted({len(x) for x in seqs})}')
    return np.asarray([np.asarray(x) for x in seqs])


# ----------------------------------------------------------------------------------------
# BERT (Optimus encoder) and GPT-2 (Optimus decoder)
# ----------------------------------------------------------------------------------------

def _bert_vocab(path: Optional[str]) -> Dict[str, int]:
    if path is None:
        path = os.path.join(VOCAB_DIR, 'bert_base_cased_vocab.txt.gz')
    elif os.path.isdir(path):
        path = _find(path, ('vocab.txt', 'bert-base-cased-vocab.txt'), 'BERT vocab.txt')
    words = _read_text(path).split('\n')
    if words and words[-1] == '':
        words.pop()
    vocab = {}
    for i, w in enumerate(words):
        if w in vocab:
            raise CheckpointError(f"'{path}' lists {w!r} twice (lines {vocab[w] + 1}, {i + 1})")
        vocab[w] = i
    return vocab


def bert_tokenizer(path: Optional[str] = None):
    """BERT-base-cased WordPiece (28,996 ids, `do_lower_case=False`), as Optimus' encoder.

    Args:
      path: None for the bundled vocabulary; or a `vocab.txt` file (one word piece per line,
        optionally gzipped), or a folder containing one.
    Returns:
      a `transformers.BertTokenizer`: [CLS] = 101, [SEP] = 102, [PAD] = 0, [UNK] = 100.
    """
    from transformers import BertTokenizer  # noqa: PLC0415
    vocab = _bert_vocab(None if path is None else os.path.abspath(path))
    tok = BertTokenizer(vocab=vocab, do_lower_case=False, model_max_length=512)
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise CheckpointError('BERT vocabulary lacks [CLS]/[SEP]')
    return tok


def _gpt2_files(path: Optional[str]):
    if path is None:
        vpath = os.path.join(VOCAB_DIR, 'gpt2_encoder.json.gz')
        mpath = os.path.join(VOCAB_DIR, 'gpt2_vocab.bpe.gz')
    elif os.path.isdir(path):
        vpath = _find(path, ('encoder.json', 'vocab.json', 'gpt2-vocab.json'), 'GPT-2 vocab')
        mpath = _find(path, ('vocab.bpe', 'merges.txt', 'gpt2-merges.txt'), 'GPT-2 merges')
    else:
        raise CheckpointError(f"GPT-2 vocabulary path '{path}' is not a folder (expected "
                              'encoder.json + vocab.bpe, or vocab.json + merges.txt)')
    return _read_json(vpath), _merges_from_text(_read_text(mpath), mpath)


def gpt2_tokenizer(path: Optional[str] = None):
    """GPT-2 byte-level BPE plus Optimus' <PAD> = 50257, <BOS> = 50258, <EOS> = 50259.

    Args:
      path: None for the bundled OpenAI files; or a folder with `encoder.json` + `vocab.bpe`
        (OpenAI names) or `vocab.json` + `merges.txt` (hub names), optionally gzipped.
    Returns:
      a `transformers.GPT2Tokenizer` of length 50,260.
    """
    from transformers import GPT2Tokenizer  # noqa: PLC0415
    vocab, merges = _gpt2_files(None if path is None else os.path.abspath(path))
    if len(vocab) != GPT2_VOCAB_SIZE:
        raise CheckpointError(f'GPT-2 vocabulary has {len(vocab)} tokens, expected '
                              f'{GPT2_VOCAB_SIZE}')
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    # One at a time, so the ids follow Optimus' order whatever order transformers uses
    # internally for a dict of special tokens.
    for attr, text in GPT2_SPECIAL_TOKENS:
        tok.add_special_tokens({attr: text})
    got = [getattr(tok, f'{attr}_id') for attr, _ in GPT2_SPECIAL_TOKENS]
    if got != [50257, 50258, 50259]:
        raise CheckpointError(f'GPT-2 special tokens got ids {got}, expected [50257, 50258, 50259]')
    return tok
