"""Model-agnostic decoding (`vd_jax.decoding`) on toy step functions with known answers.

The toy model has a small vocabulary and next-token logits that depend on the last token
AND on a running state kept in the cache (a per-row sum of the tokens seen), so a beam
search that reorders its cache wrongly produces wrong scores. References are plain numpy:
a greedy loop, and an exhaustive enumeration of every possible output for beam search.
The Optimus model itself is decoded in tests/test_optimus.py.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vd_jax.decoding import (beam_search, greedy_search, sample, top_k_top_p_filtering)

V, EOS, PAD, START = 5, 4, 0, 0
M = 3  # the state term cycles with period M


def _tables(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1.5, (V, V)).astype(np.float32),
            rng.normal(0, 1.5, (M, V)).astype(np.float32))


def _toy(a, b):
    """step(last (B,), cache) with cache = {'sum': (B,), 'steps': scalar}."""
    a, b = jnp.asarray(a), jnp.asarray(b)

    def step(last, cache):
        s = cache['sum'] + last
        logits = a[last] + b[s % M]
        return logits, {'sum': s, 'steps': cache['steps'] + 1}
    return step


def _cache(batch):
    return {'sum': jnp.zeros((batch,), jnp.int32), 'steps': jnp.int32(0)}


def _np_logits(a, b, seq):
    """Logits after the prefix `seq` (numpy, the same toy)."""
    return a[seq[-1]] + b[sum(seq) % M]


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _np_greedy(a, b, start, max_length):
    seq, score = [start], 0.0
    while True:
        lg = _np_logits(a, b, seq)
        t = int(np.argmax(lg))
        if len(seq) + 1 >= max_length:
            seq.append(EOS)
            break
        score += _log_softmax(lg)[t]
        seq.append(t)
        if t == EOS:
            break
    return seq, score


def test_greedy_eos_and_max_length():
    # hand-made chain: 1 -> 2 -> 3 -> EOS; 2 -> 2 -> ... (never EOS); EOS first from 3
    a = np.full((V, V), -5.0, np.float32)
    a[1, 2] = a[2, 2] = a[3, EOS] = 5.0
    b = np.zeros((M, V), np.float32)
    step = _toy(a, b)
    a2 = a.copy()
    a2[1, 2], a2[1, 3] = -5.0, 5.0  # a second table: 1 -> 3 -> EOS
    out = jax.jit(lambda s: greedy_search(step, _cache(3), s, eos_id=EOS, pad_id=PAD,
                                          max_length=6))(jnp.array([1, 2, 3]))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    # row 0: 1 2 2 2 2 -> length reaches 6: last token forced to EOS
    np.testing.assert_array_equal(tokens[0], [1, 2, 2, 2, 2, EOS])
    # row 1: 2 2 2 2 2 EOS (forced), row 2: 3 EOS then padding
    np.testing.assert_array_equal(tokens[1], [2, 2, 2, 2, 2, EOS])
    np.testing.assert_array_equal(tokens[2], [3, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(lengths, [6, 6, 2])
    out = greedy_search(_toy(a2, b), _cache(1), jnp.array([1]), eos_id=EOS, pad_id=PAD,
                        max_length=30)
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, :4], [1, 3, EOS, PAD])
    assert int(out.lengths[0]) == 3


def test_greedy_matches_numpy_reference_batched():
    a, b = _tables(1)
    starts = np.array([0, 1, 2, 3])
    out = greedy_search(_toy(a, b), _cache(4), jnp.asarray(starts), eos_id=EOS, pad_id=PAD,
                        max_length=9)
    for r, s0 in enumerate(starts):
        seq, score = _np_greedy(a, b, int(s0), 9)
        n = len(seq)
        assert int(out.lengths[r]) == n
        np.testing.assert_array_equal(np.asarray(out.tokens)[r, :n], seq)
        assert np.all(np.asarray(out.tokens)[r, n:] == PAD)
        np.testing.assert_allclose(float(out.scores[r]), score, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    step = _toy(*_tables())
    with pytest.raises(ValueError, match='max_length'):
        greedy_search(step, _cache(1), jnp.array([0]), eos_id=EOS, pad_id=PAD, max_length=1)
    with pytest.raises(ValueError, match='start_tokens'):
        greedy_search(step, _cache(1), jnp.array(0), eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match='PRNG key'):
        sample(step, _cache(1), jnp.array([0]), None, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match='temperature'):
        sample(step, _cache(1), jnp.array([0]), jax.random.PRNGKey(0), eos_id=EOS, pad_id=PAD,
               temperature=0.0)
    with pytest.raises(ValueError, match='beam_size'):
        beam_search(step, _cache(1), jnp.array([0]), beam_size=0, eos_id=EOS, pad_id=PAD)


# ----------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------

def _exhaustive_best(a, b, start, max_length, length_penalty):
    """Every possible output: eos at generated position j < max_length - 1 (score includes
    its log-prob), or the forced eos at the last position (adds nothing)."""
    best = (-np.inf, None)
    for n_gen in range(1, max_length):      # generated tokens including eos
        forced = n_gen == max_length - 1
        for body in itertools.product(range(V - 1), repeat=n_gen - 1):   # non-eos tokens
            seq, score = [start], 0.0
            for t in body:
                score += _log_softmax(_np_logits(a, b, seq))[t]
                seq.append(t)
            if not forced:
                score += _log_softmax(_np_logits(a, b, seq))[EOS]
            seq.append(EOS)
            norm = score / n_gen ** length_penalty
            if norm > best[0]:
                best = (norm, seq)
    return best


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_beam_search_wide_beam_is_exhaustive(length_penalty):
    """With K >= every live prefix times V, the rank-K rule never drops a candidate and no
    hypothesis is pruned, so beam search (early_stopping=False) must find the global best;
    a wrong cache reorder, score bookkeeping or stopping bound breaks this."""
    a, b = _tables(2)
    L = 5
    K = (V - 1) ** (L - 2) * V
    starts = np.array([0, 2])
    out = beam_search(_toy(a, b), _cache(2), jnp.asarray(starts), beam_size=K, eos_id=EOS,
                      pad_id=PAD, max_length=L, length_penalty=length_penalty,
                      early_stopping=False)
    for r, s0 in enumerate(starts):
        score, seq = _exhaustive_best(a, b, int(s0), L, length_penalty)
        n = len(seq)
        np.testing.assert_array_equal(np.asarray(out.tokens)[r, :n], seq)
        assert int(out.lengths[r]) == n
        assert np.all(np.asarray(out.tokens)[r, n:] == PAD)
        np.testing.assert_allclose(float(out.scores[r]), score, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_beam_one_is_greedy_and_beam_improves_on_it():
    a, b = _tables(9)   # a table where greedy is suboptimal for 3 of the 4 starts
    starts = jnp.array([0, 1, 2, 3, 0])
    g = greedy_search(_toy(a, b), _cache(5), starts, eos_id=EOS, pad_id=PAD, max_length=6)
    b1 = beam_search(_toy(a, b), _cache(5), starts, beam_size=1, eos_id=EOS, pad_id=PAD,
                     max_length=6)
    np.testing.assert_array_equal(np.asarray(b1.tokens), np.asarray(g.tokens))
    np.testing.assert_array_equal(np.asarray(b1.lengths), np.asarray(g.lengths))
    # with no length penalty, an exhaustive search never scores below greedy
    wide = beam_search(_toy(a, b), _cache(5), starts, beam_size=(V - 1) ** 4 * V, eos_id=EOS,
                       pad_id=PAD, max_length=6, length_penalty=0.0, early_stopping=False)
    assert np.all(np.asarray(wide.scores) >= np.asarray(g.scores) - 1e-5)
    assert np.sum(np.asarray(wide.scores) > np.asarray(g.scores) + 0.3) == 4


# ----------------------------------------------------------------------------------------
# Sampling and filtering
# ----------------------------------------------------------------------------------------

def _torch_filter(logits, top_k, top_p):
    """Reference: top-k / nucleus filtering with the semantics of the original's
    `top_k_top_p_filtering`, one row at a time, in torch."""
    out = []
    for row in torch.from_numpy(np.array(logits)):
        row = row.clone()
        if top_k > 0:
            row[row < torch.topk(row, top_k)[0][-1]] = -float('inf')
        if top_p > 0:
            s, idx = torch.sort(row, descending=True)
            cum = torch.cumsum(torch.softmax(s, -1), -1)
            rm = cum > top_p
            rm[1:] = rm[:-1].clone()
            rm[0] = False
            row[idx[rm]] = -float('inf')
        out.append(row.numpy())
    return np.stack(out)


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (3, 0.0), (0, 0.6), (5, 0.9), (1, 0.0),
                                         (0, 1e-6)])
def test_filtering_matches_reference(top_k, top_p):
    logits = np.random.default_rng(4).normal(0, 2, (6, 40)).astype(np.float32)
    ours = np.asarray(top_k_top_p_filtering(jnp.asarray(logits), top_k, top_p))
    ref = _torch_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])
    if top_k == 1 or top_p == 1e-6:
        assert np.all((~np.isinf(ours)).sum(-1) == 1)


def test_sampling_distribution_and_keys():
    """First sampled token of 4000 rows vs softmax(filter(logits / T)): within 5 sigma.
    Same key -> same output; another key -> a different one."""
    base = np.array([1.0, 0.2, -0.5, 2.0, 0.0], np.float32)
    a = np.tile(base, (V, 1))
    step = _toy(a, np.zeros((M, V), np.float32))
    n = 4000
    run = jax.jit(lambda key, t: sample(step, _cache(n), jnp.zeros((n,), jnp.int32), key,
                                        eos_id=EOS, pad_id=PAD, temperature=t, max_length=3))
    for temp in (1.0, 0.5):
        out = run(jax.random.PRNGKey(0), temp)
        first = np.asarray(out.tokens)[:, 1]
        freq = np.bincount(first, minlength=V) / n
        p = np.exp(base / temp) / np.exp(base / temp).sum()
        assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (temp, freq, p)
    again = run(jax.random.PRNGKey(0), 0.5)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    other = run(jax.random.PRNGKey(1), 0.5)
    assert np.mean(np.asarray(other.tokens)[:, 1] != np.asarray(out.tokens)[:, 1]) > 0.2
    # top_k=2 keeps exactly tokens 3 and 0, renormalised
    out = sample(step, _cache(n), jnp.zeros((n,), jnp.int32), jax.random.PRNGKey(2), eos_id=EOS,
                 pad_id=PAD, top_k=2, max_length=3)
    first = np.asarray(out.tokens)[:, 1]
    assert set(np.unique(first)) == {0, 3}
    p3 = np.exp(2.0) / (np.exp(2.0) + np.exp(1.0))
    assert abs(np.mean(first == 3) - p3) < 5 * np.sqrt(p3 * (1 - p3) / n)


def test_sample_top_k_1_is_greedy():
    a, b = _tables(5)
    starts = jnp.array([0, 1, 2])
    g = greedy_search(_toy(a, b), _cache(3), starts, eos_id=EOS, pad_id=PAD, max_length=10)
    s = sample(_toy(a, b), _cache(3), starts, jax.random.PRNGKey(7), eos_id=EOS, pad_id=PAD,
               top_k=1, max_length=10)
    np.testing.assert_array_equal(np.asarray(s.tokens), np.asarray(g.tokens))
    np.testing.assert_array_equal(np.asarray(s.lengths), np.asarray(g.lengths))


@pytest.mark.parametrize('typed', [False, True])
def test_per_row_keys_do_not_depend_on_the_batch(typed):
    a, b = _tables(6)
    root = jax.random.key(3) if typed else jax.random.PRNGKey(3)
    keys = jax.random.split(root, 3)
    kw = dict(eos_id=EOS, pad_id=PAD, max_length=8)
    full = sample(_toy(a, b), _cache(3), jnp.array([0, 1, 2]), keys, **kw)
    alone = sample(_toy(a, b), _cache(1), jnp.array([1]), keys[1:2], **kw)
    np.testing.assert_array_equal(np.asarray(full.tokens)[1], np.asarray(alone.tokens)[0])
    with pytest.raises(ValueError, match='2 per-row keys for 3 rows'):
        sample(_toy(a, b), _cache(3), jnp.array([0, 1, 2]), keys[:2], **kw)
