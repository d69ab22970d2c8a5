"""Shared primitives: the blockwise attention equals the dense one (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.models.layers import BOUND_MIN_SUM, attention, blockwise_attention


@pytest.mark.slow
@pytest.mark.parametrize('shift', ['running', 'bound'])
def test_blockwise_attention_equals_dense_for_ragged_lengths(shift):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    # lengths that are not multiples of the blocks: padding keys masked, padding queries dropped
    q = jax.random.normal(ks[0], (2, 300, 32))
    k = jax.random.normal(ks[1], (2, 700, 32)) * 2
    v = jax.random.normal(ks[2], (2, 700, 32))
    dense = attention(q, k, v, 4, implementation='dense')
    block = blockwise_attention(q, k, v, 4, scale=8 ** -0.5, q_block=128, k_block=256, shift=shift)
    assert block.shape == dense.shape
    np.testing.assert_allclose(np.asarray(block), np.asarray(dense), atol=2e-6)

    def loss(f, q, k, v):
        return jnp.sum(jnp.sin(f(q, k, v)))
    gd = jax.grad(lambda *a: loss(lambda q, k, v: attention(q, k, v, 4, implementation='dense'), *a),
                  argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *a: loss(lambda q, k, v: blockwise_attention(
        q, k, v, 4, 8 ** -0.5, q_block=128, k_block=256, shift=shift), *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gd, gb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_bound_shift_falls_back_where_the_bound_is_too_loose():
    """Large, unaligned q and k: |q||k| far above every logit, so exp(logit - bound) would
    underflow; those query blocks take the running max and the values stay the softmax's.
    Small ones take the bound (no fallback): both give dense attention's values."""
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(ks[0], (1, 256, 32))
    k = jax.random.normal(ks[1], (1, 1024, 32))
    v = jax.random.normal(ks[2], (1, 1024, 32))
    big = q.at[:, :128].multiply(40.0)      # the first query block's bound gap is >> 60
    for qq, kk in ((q, k), (big, k * 3)):
        dense = np.asarray(attention(qq, kk, v, 4, implementation='dense'))
        bound = np.asarray(blockwise_attention(qq, kk, v, 4, 8 ** -0.5, q_block=128,
                                               k_block=512, shift='bound'))
        assert np.all(np.isfinite(bound))
        np.testing.assert_allclose(bound, dense, atol=2e-6)


    def min_sum(qq, kk):   # the smallest row sum of exp(logit - bound) in the first block
        qh = qq[0, :128].reshape(128, 4, 8) * 8 ** -0.5
        kh = kk[0].reshape(1024, 4, 8)
        bound = (jnp.linalg.norm(qh, axis=-1).T[..., None]
                 * jnp.linalg.norm(kh, axis=-1).max(0)[:, None, None])
        return float(jnp.exp(jnp.einsum('qhd,khd->hqk', qh, kh) - bound).sum(-1).min())
    # the test's premises: the small inputs keep the bound, the big ones underflow without
    # the fallback
    assert min_sum(q, k) >= BOUND_MIN_SUM > min_sum(big, k * 3)
    with pytest.raises(ValueError, match='shift'):
        blockwise_attention(q, k, v, 4, 1.0, shift='max')


def test_auto_switches_on_long_key_sequences():
    q = jnp.ones((1, 4, 8))
    short = jax.make_jaxpr(lambda q, k: attention(q, k, k, 2))(q, jnp.ones((1, 77, 8)))
    long = jax.make_jaxpr(lambda q, k: attention(q, k, k, 2))(q, jnp.ones((1, 1100, 8)))
    assert 'scan' not in str(short) and 'scan' in str(long)
