"""Autoregressive decoding over a step function: greedy, sampling, beam search.

Model-agnostic: every algorithm drives a *step function*

    step_fn(last_tokens (B,) int32, cache) -> (logits (B, V), cache)

that consumes the latest token of each row and returns the next-token logits. The cache is
any pytree the model needs (a KV cache, a position counter...); beam search reorders its
leaves that have a leading batch axis (`ndim >= 1`) and leaves scalars (shared step
counters) alone, so a cache must keep the batch on axis 0 of every non-scalar leaf.

Length and stopping follow Optimus' sampler (SHI-Labs `lib/model_zoo/optimus.py`,
`sample_single_sequence_conditional`): a row starts as `[start]` (length 1); after each
appended token the row stops if that token is `eos_id`, and when the length reaches
`max_length` the token just appended is replaced by `eos_id`. So every output is
`start, t_1, ..., t_n, eos` with length n + 2 <= max_length (28 content tokens at the
default 30). Finished rows are padded with `pad_id`.

Everything runs under `jit` as one `lax.while_loop` (it exits as soon as every row has
finished), so one compilation serves every batch of the same shape. Hyper-parameters that
change the program (`max_length`, `top_k`, `top_p`, `beam_size`, ...) are Python values;
`temperature` may be traced.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[jnp.ndarray, Any], Tuple[jnp.ndarray, Any]]

# Optimus decodes at most 30 tokens including <BOS> and <EOS> (optimus.py, decode()).
DEFAULT_MAX_LENGTH = 30
NEG_INF = -np.inf


class DecodeOutput(NamedTuple):
    """tokens (B, max_length) int32: start token, generated tokens, eos, then pad_id;
    lengths (B,) int32: tokens up to and including eos; scores (B,) float32: sum of the
    log-probabilities of the chosen tokens (beam search: length-normalised), else zeros."""
    tokens: jnp.ndarray
    lengths: jnp.ndarray
    scores: jnp.ndarray


def _check_common(start_tokens, max_length):
    if getattr(start_tokens, 'ndim', None) != 1:
        raise ValueError(f'start_tokens must be (B,) integer ids, got shape '
                         f'{getattr(start_tokens, "shape", None)}')
    if not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f'max_length must be an int >= 2 (start token + eos), got {max_length!r}')


# ----------------------------------------------------------------------------------------
# Logit filtering
# ----------------------------------------------------------------------------------------

def top_k_top_p_filtering(logits, top_k: int = 0, top_p: float = 0.0,
                          filter_value: float = NEG_INF):
    """Top-k and nucleus filtering of logits (..., V), as the original's
    `top_k_top_p_filtering` (Holtzman et al.), batched.

    top_k > 0: logits below the k-th largest are set to `filter_value` (ties with the k-th
      are kept).
    top_p > 0: with tokens sorted by decreasing logit, a token is removed when the
      cumulative probability of the tokens *before* it already exceeds top_p, i.e. the
      smallest prefix whose mass exceeds top_p is kept (always at least the top token).
      Note top_p = 1.0 is not a strict no-op, as in the original: the float32
      cumulative sum can exceed 1 in the far tail, which then is dropped (mass ~1e-7).
    Both are Python numbers (they change the program); 0 disables a filter.
    """
    logits = jnp.asarray(logits)
    v = logits.shape[-1]
    if top_k and top_k > 0:
        k = min(int(top_k), v)
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, filter_value, logits)
    if top_p and top_p > 0.0:
        order = jnp.argsort(-logits, axis=-1)            # descending, stable
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
        remove_sorted = cum > top_p
        # shift right: keep the first token that crosses the threshold, never drop the top one
        remove_sorted = jnp.concatenate(
            [jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
        # back to vocabulary order: token order[j] gets remove_sorted[j] (a scatter, cheaper
        # than a second sort)
        flat_order = order.reshape(-1, v)
        rows = jnp.arange(flat_order.shape[0])[:, None]
        remove = jnp.zeros(flat_order.shape, bool).at[rows, flat_order].set(
            remove_sorted.reshape(-1, v)).reshape(logits.shape)
        logits = jnp.where(remove, filter_value, logits)
    return logits


# ----------------------------------------------------------------------------------------
# Greedy and sampling: one loop, two token choosers
# ----------------------------------------------------------------------------------------

def _decode_loop(step_fn: StepFn, cache, start_tokens, choose, max_length: int, eos_id: int,
                 pad_id: int) -> DecodeOutput:
    """Shared loop; `choose(logits (B, V) float32, i) -> (tokens (B,), logprobs (B,))`."""
    _check_common(start_tokens, max_length)
    b = start_tokens.shape[0]
    start_tokens = start_tokens.astype(jnp.int32)
    tokens = jnp.full((b, max_length), pad_id, jnp.int32).at[:, 0].set(start_tokens)
    lengths = jnp.full((b,), max_length, jnp.int32)
    scores = jnp.zeros((b,), jnp.float32)
    finished = jnp.zeros((b,), bool)

    def cond(state):
        i, _, _, finished, _, _ = state
        return (i < max_length - 1) & ~jnp.all(finished)

    def body(state):
        i, tokens, cache, finished, lengths, scores = state
        last = jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)
        logits, cache = step_fn(last, cache)
        nxt, logp = choose(logits.astype(jnp.float32), i)
        # the row reaches max_length with this token: it becomes eos (original behaviour)
        forced = i + 2 >= max_length
        nxt = jnp.where(forced, eos_id, nxt)
        nxt = jnp.where(finished, pad_id, nxt).astype(jnp.int32)
        scores = scores + jnp.where(finished | forced, 0.0, logp)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, i + 1, axis=1)
        newly = ~finished & (nxt == eos_id)
        lengths = jnp.where(newly, i + 2, lengths)
        return i + 1, tokens, cache, finished | newly, lengths, scores

    state = (jnp.int32(0), tokens, cache, finished, lengths, scores)
    _, tokens, _, _, lengths, scores = jax.lax.while_loop(cond, body, state)
    return DecodeOutput(tokens, lengths, scores)


def greedy_search(step_fn: StepFn, cache, start_tokens, *, eos_id: int, pad_id: int,
                  max_length: int = DEFAULT_MAX_LENGTH) -> DecodeOutput:
    """Argmax decoding (ties -> lowest id). See the module docstring for lengths/stopping.

    Args:
      step_fn: (last_tokens (B,), cache) -> (logits (B, V), cache).
      cache: the step function's state after the prompt (e.g. the latent memory).
      start_tokens: (B,) first token of each row (Optimus: <BOS>).
      eos_id, pad_id: end token; filler after it.
      max_length: maximum length including start and eos.
    Returns:
      `DecodeOutput`; scores = sum of log-softmax of the chosen tokens (forced eos excluded).
    """
    def choose(logits, i):
        tok = jnp.argmax(logits, axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], -1)[:, 0]
        return tok, logp
    return _decode_loop(step_fn, cache, start_tokens, choose, max_length, eos_id, pad_id)


def _is_key_batch(key) -> bool:
    """True for one key per row: typed keys of shape (B,) or raw uint32 keys (B, 2)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def sample(step_fn: StepFn, cache, start_tokens, key, *, eos_id: int, pad_id: int,
           temperature=1.0, top_k: int = 0, top_p: float = 0.0,
           max_length: int = DEFAULT_MAX_LENGTH) -> DecodeOutput:
    """Ancestral sampling from softmax(filter(logits / temperature)), as Optimus' decoder
    (which uses temperature 1, top_k 0, top_p 1.0).

    Args:
      key: a PRNG key, or one key per row ((B,) typed keys or (B, 2) raw keys). Step i
        draws with `fold_in(key, i)`. With one key the rows are drawn jointly (a row's
        sample depends on the batch shape); with per-row keys a row depends only on its
        own key and inputs, whatever batch it is in.
      temperature: > 0, may be a traced scalar.
      top_k, top_p: see `top_k_top_p_filtering` (Python numbers).
      Other arguments as `greedy_search`.
    Returns:
      `DecodeOutput`; scores = sum of log-probabilities of the drawn tokens under the
      filtered, tempered distribution.
    """
    if key is None:
        raise ValueError('sample: a PRNG key is required (key=jax.random.key(seed))')
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f'sample: temperature must be > 0, got {temperature}; use '
                         'greedy_search for argmax decoding')

    per_row = _is_key_batch(key)
    if per_row and key.shape[0] != start_tokens.shape[0]:
        raise ValueError(f'sample: {key.shape[0]} per-row keys for {start_tokens.shape[0]} rows')

    def draw(k, i, logits):
        return jax.random.categorical(jax.random.fold_in(k, i), logits, axis=-1)

    def choose(logits, i):
        filt = top_k_top_p_filtering(logits / temperature, top_k, top_p)
        if per_row:
            tok = jax.vmap(draw, in_axes=(0, None, 0))(key, i, filt)
        else:
            tok = draw(key, i, filt)
        logp = jnp.take_along_axis(jax.nn.log_softmax(filt), tok[:, None], -1)[:, 0]
        return tok, logp
    return _decode_loop(step_fn, cache, start_tokens, choose, max_length, eos_id, pad_id)


# ----------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------

def _map_batch_leaves(fn, cache):
    """Apply fn to every cache leaf with a leading batch axis; scalars pass through."""
    return jax.tree_util.tree_map(lambda x: fn(x) if jnp.ndim(x) >= 1 else x, cache)


def beam_search(step_fn: StepFn, cache, start_tokens, *, beam_size: int, eos_id: int,
                pad_id: int, max_length: int = DEFAULT_MAX_LENGTH,
                length_penalty: float = 1.0, early_stopping: bool = True) -> DecodeOutput:
    """Beam search with `beam_size` hypotheses per row; returns the best finished one.

    Each step extends every live beam by every token (score = sum of log-softmax) and keeps
    the 2K best candidates. A candidate ending in `eos_id` becomes a finished hypothesis if
    it ranks among the first K (as transformers' beam search); the best K non-eos
    candidates stay alive. When the length reaches `max_length`, every live beam is
    finished with a forced eos that adds nothing to its score (the original forces eos
    there regardless of its probability). Finished hypotheses are ranked by
    `score / n ** length_penalty`, n = generated tokens including eos.

    A row is done when
      * early_stopping=True: it has K finished hypotheses (so beam_size=1 is exactly greedy);
      * early_stopping=False: no live beam can still beat its worst kept hypothesis (bound:
        log-probabilities are <= 0, so a live score can only drop; the most favourable
        length is the longest one if length_penalty > 0, the next one otherwise).

    Args:
      beam_size: K >= 1.
      length_penalty: exponent of the length normalisation (0 = raw sum of log-probs).
      Other arguments as `greedy_search`; the cache is expanded to B*K rows (beam-major
      within each row) and reordered as beams are selected.
    Returns:
      `DecodeOutput` of the best hypothesis of each row; scores are length-normalised.
    """
    _check_common(start_tokens, max_length)
    if not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise ValueError(f'beam_size must be an int >= 1, got {beam_size!r}')
    k_beams, n = int(beam_size), max_length
    b = start_tokens.shape[0]
    lp = float(length_penalty)

    def norm(score, gen_len):
        return score / jnp.asarray(gen_len, jnp.float32) ** lp

    alive_seq = jnp.full((b, k_beams, n), pad_id, jnp.int32).at[:, :, 0].set(
        start_tokens.astype(jnp.int32)[:, None])
    # only beam 0 is live at first, so the K copies of the start cannot yield duplicates
    alive_logp = jnp.full((b, k_beams), NEG_INF, jnp.float32).at[:, 0].set(0.0)
    fin_seq = jnp.full((b, k_beams, n), pad_id, jnp.int32)
    fin_score = jnp.full((b, k_beams), NEG_INF, jnp.float32)
    fin_len = jnp.ones((b, k_beams), jnp.int32)
    done = jnp.zeros((b,), bool)
    cache = _map_batch_leaves(lambda x: jnp.repeat(x, k_beams, axis=0), cache)
    rows = jnp.arange(b)[:, None]

    def cond(state):
        i, done = state[0], state[-1]
        return (i < n - 1) & ~jnp.all(done)

    def body(state):
        i, alive_seq, alive_logp, cache, fin_seq, fin_score, fin_len, done = state
        last = jax.lax.dynamic_index_in_dim(alive_seq, i, axis=2, keepdims=False)
        logits, cache = step_fn(last.reshape(b * k_beams), cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        v = logp.shape[-1]
        forced = i + 2 >= n
        # at the last position every live beam ends with eos, score unchanged
        eos_only = jnp.where(jnp.arange(v) == eos_id, 0.0, NEG_INF)
        logp = jnp.where(forced, eos_only[None], logp)
        cand = (alive_logp[:, :, None] + logp.reshape(b, k_beams, v)).reshape(b, k_beams * v)
        n_cand = min(2 * k_beams, k_beams * v)
        top_score, top_idx = jax.lax.top_k(cand, n_cand)
        top_beam, top_tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        is_eos = top_tok == eos_id
        # candidate sequences: parent beam + the new token at position i + 1
        parent = alive_seq[rows, top_beam]                                 # (B, 2K, n)
        cand_seq = jax.lax.dynamic_update_index_in_dim(parent, top_tok, i + 1, axis=2)
        gen_len = i + 1

        # finished: eos candidates ranked among the first K, rows not done yet
        eligible = is_eos & (jnp.arange(n_cand) < k_beams)[None] & ~done[:, None]
        new_fin = jnp.where(eligible, norm(top_score, gen_len), NEG_INF)
        all_score = jnp.concatenate([fin_score, new_fin], axis=1)
        all_seq = jnp.concatenate([fin_seq, cand_seq], axis=1)
        all_len = jnp.concatenate([fin_len, jnp.full(new_fin.shape, i + 2, jnp.int32)], axis=1)
        fin_score, keep = jax.lax.top_k(all_score, k_beams)
        fin_seq, fin_len = all_seq[rows, keep], all_len[rows, keep]

        # alive: the K best non-eos candidates
        alive_cand = jnp.where(is_eos, NEG_INF, top_score)
        alive_logp, pick = jax.lax.top_k(alive_cand, k_beams)
        alive_seq = cand_seq[rows, pick]
        src = (rows * k_beams + jnp.take_along_axis(top_beam, pick, axis=1)).reshape(-1)
        cache = _map_batch_leaves(lambda x: x[src], cache)

        have_k = jnp.all(fin_score > NEG_INF, axis=1)
        if early_stopping:
            now_done = have_k
        else:
            best_alive = alive_logp[:, 0]
            bound_len = (n - 1) if lp > 0 else (i + 2)
            bound = norm(best_alive, bound_len)
            now_done = have_k & (fin_score[:, -1] >= bound)
        now_done = now_done | ~jnp.any(alive_logp > NEG_INF, axis=1)
        return (i + 1, alive_seq, alive_logp, cache, fin_seq, fin_score, fin_len,
                done | now_done)

    state = (jnp.int32(0), alive_seq, alive_logp, cache, fin_seq, fin_score, fin_len, done)
    state = jax.lax.while_loop(cond, body, state)
    fin_seq, fin_score, fin_len = state[4], state[5], state[6]
    # top_k sorted them: slot 0 is the best of each row
    return DecodeOutput(fin_seq[:, 0], fin_len[:, 0], fin_score[:, 0])
