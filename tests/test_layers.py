"""Shared primitives: the blockwise attention equals the dense one (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.models.layers import attention, blockwise_attention


@pytest.mark.slow
def test_blockwise_attention_equals_dense_for_ragged_lengths():
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    # lengths that are not multiples of the blocks: padding keys masked, padding queries dropped
    q = jax.random.normal(ks[0], (2, 300, 32))
    k = jax.random.normal(ks[1], (2, 700, 32)) * 2
    v = jax.random.normal(ks[2], (2, 700, 32))
    dense = attention(q, k, v, 4, implementation='dense')
    block = blockwise_attention(q, k, v, 4, scale=8 ** -0.5, q_block=128, k_block=256)
    assert block.shape == dense.shape
    np.testing.assert_allclose(np.asarray(block), np.asarray(dense), atol=2e-6)

    def loss(f, q, k, v):
        return jnp.sum(jnp.sin(f(q, k, v)))
    gd = jax.grad(lambda *a: loss(lambda q, k, v: attention(q, k, v, 4, implementation='dense'), *a),
                  argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *a: loss(lambda q, k, v: blockwise_attention(q, k, v, 4, 8 ** -0.5, q_block=128,
                                                                      k_block=256), *a),
                  argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gd, gb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_auto_switches_on_long_key_sequences():
    q = jnp.ones((1, 4, 8))
    short = jax.make_jaxpr(lambda q, k: attention(q, k, k, 2))(q, jnp.ones((1, 77, 8)))
    long = jax.make_jaxpr(lambda q, k: attention(q, k, k, 2))(q, jnp.ones((1, 1100, 8)))
    assert 'scan' not in str(short) and 'scan' in str(long)
