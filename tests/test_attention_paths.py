"""The attention paths of `vd_jax.models.layers.attention` agree, on CPU.

'fused' (`jax.nn.dot_product_attention`, what 'auto' picks on GPU/TPU backends) is run here
on CPU with `implementation='xla'` forced, or with JAX's default (None, which is XLA's
formulation in jax 0.10.2): the same code path a GPU/TPU takes, on another backend. It is
compared with the CPU paths ('dense' head-major matmuls, 'blockwise' online softmax):
  * values within 2e-6 max abs (float32, outputs of magnitude ~1: only the summation and
    normalisation order differ; measured <= 9e-7), with additive masks (causal, padding, a
    per-query bias) and custom scales;
  * gradients (q, k, v and the bias) within 1e-5 max abs (measured <= 7e-7);
  * bfloat16 inputs within 2e-2 (bf16 rounding of the probabilities, eps 7.8e-3; measured
    4.7e-3 against the float32 reference).
Routing: on CPU 'auto' is bit-identical to the paths it always took and never calls the
fused function; with the backend reported as an accelerator (`fused_by_default` patched)
every call site (the diffuser's cross/self-attention, CLIP text and image towers, the VAE's
AttnBlock, Optimus' BERT and GPT-2 with its KV cache) goes through it and gives the CPU
values within 1e-5 (measured <= 5e-7), parameter gradients within 1e-5 of their scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.config import load_config
from vd_jax.models import layers
from vd_jax.models.init import abstract_params, random_params

VAL_TOL, GRAD_TOL, BF16_TOL, MODULE_TOL = 2e-6, 1e-5, 2e-2, 1e-5


def _qkv(seed, b, lq, lk, inner, dtype=np.float32):
    g = np.random.default_rng(seed)
    return tuple(jnp.asarray(g.standard_normal((b, n, inner)).astype(dtype)) for n in (lq, lk, lk))


def _max(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _fused(q, k, v, heads, impl='xla', **kw):
    return layers.attention(q, k, v, heads, implementation='fused', fused_implementation=impl, **kw)


def _masks(b, lq, lk):
    causal = jnp.where(jnp.tril(jnp.ones((lq, lk), bool)), 0.0, -1e9)[None, None]  # CLIP, GPT-2
    keep = np.ones((b, lk), np.float32)
    keep[1, lk - 5:] = 0  # padding of the second sequence, as BERT's attention_mask
    padding = jnp.asarray((1 - keep)[:, None, None, :] * -1e4)
    per_query = jnp.asarray(np.random.default_rng(9).standard_normal((b, 1, lq, lk)), jnp.float32)
    return dict(causal=causal, padding=padding, per_query=per_query)


@pytest.mark.parametrize('lq,lk,heads,d', [(64, 64, 4, 16), (64, 77, 2, 32), (16, 257, 1, 64),
                                           (48, 600, 4, 8)])
@pytest.mark.slow
def test_fused_values_equal_cpu_paths(lq, lk, heads, d):
    q, k, v = _qkv(lq + lk, 2, lq, lk, heads * d)
    dense = layers.attention(q, k, v, heads, implementation='dense')
    for impl in ('xla', None):
        assert _max(_fused(q, k, v, heads, impl), dense) < VAL_TOL
    assert _max(layers.attention(q, k, v, heads, implementation='blockwise'), dense) < VAL_TOL
    assert _max(_fused(q, k, v, heads, scale=0.3), layers.attention(
        q, k, v, heads, scale=0.3, implementation='dense')) < VAL_TOL
    for name, bias in _masks(2, lq, lk).items():
        if name == 'causal' and lq != lk:
            continue
        want = layers.attention(q, k, v, heads, bias=bias, implementation='dense')
        assert _max(_fused(q, k, v, heads, bias=bias), want) < VAL_TOL, name
    if lq == lk:  # the masked keys really are out: equal to attention over the kept keys only
        full = _fused(q, k, v, heads, bias=_masks(2, lq, lk)['padding'])[1]
        kept = layers.attention(q[1:], k[1:, :lk - 5], v[1:, :lk - 5], heads, implementation='dense')[0]
        assert _max(full, kept) < VAL_TOL


@pytest.mark.parametrize('lq,lk,bias', [(64, 64, 'causal'), (64, 77, 'padding'), (64, 77, 'per_query'),
                                        (24, 600, None)])
@pytest.mark.slow
def test_fused_gradients_equal_cpu_paths(lq, lk, bias):
    heads, d = 2, 16
    q, k, v = _qkv(7, 2, lq, lk, heads * d)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((2, lq, heads * d)), jnp.float32)
    bias = _masks(2, lq, lk)[bias] if bias else None
    args = (q, k, v) + ((bias,) if bias is not None else ())
    argnums = tuple(range(len(args)))

    def loss(impl, fused_impl=None):
        def f(q, k, v, *b):
            out = layers.attention(q, k, v, heads, bias=b[0] if b else None, implementation=impl,
                                   fused_implementation=fused_impl)
            return jnp.sum(out * w)
        return jax.jit(jax.grad(f, argnums=argnums))(*args)

    want = loss('dense' if bias is not None else 'blockwise')
    for got in (loss('fused', 'xla'), loss('fused')):
        for g, r in zip(got, want):
            assert _max(g, r) < GRAD_TOL
    if bias is None:
        for g, r in zip(loss('dense'), want):
            assert _max(g, r) < GRAD_TOL


@pytest.mark.slow
def test_fused_bfloat16():
    q, k, v = _qkv(3, 2, 64, 77, 64, np.float32)
    ref = layers.attention(q, k, v, 4, implementation='dense')
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = _fused(qb, kb, vb, 4, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert _max(out, layers.attention(qb, kb, vb, 4, dtype=jnp.bfloat16, implementation='dense')) < BF16_TOL
    assert _max(out, ref) < BF16_TOL


def test_bad_implementation_is_named():
    q, k, v = _qkv(0, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="'flash'"):
        layers.attention(q, k, v, 2, implementation='flash')


# ----------------------------------------------------------------------------------------
# Routing and call sites
# ----------------------------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Records the `implementation` of every jax.nn.dot_product_attention call."""
    calls = []
    real = jax.nn.dot_product_attention

    def wrapped(*a, **kw):
        calls.append(kw.get('implementation'))
        return real(*a, **kw)
    monkeypatch.setattr(jax.nn, 'dot_product_attention', wrapped)
    return calls


@pytest.mark.slow
def test_auto_on_cpu_is_unchanged(spy):
    assert jax.default_backend() == 'cpu' and not layers.fused_by_default()
    for lk, path in ((77, 'dense'), (600, 'blockwise')):
        q, k, v = _qkv(lk, 2, 32, lk, 32)
        np.testing.assert_array_equal(layers.attention(q, k, v, 2),
                                      layers.attention(q, k, v, 2, implementation=path))
    bias = _masks(2, 32, 600)['padding']
    np.testing.assert_array_equal(layers.attention(q, k, v, 2, bias=bias),
                                  layers.attention(q, k, v, 2, bias=bias, implementation='dense'))
    assert spy == []


def test_auto_on_accelerators_is_fused(monkeypatch, spy):
    monkeypatch.setattr(layers, 'fused_by_default', lambda: True)
    q, k, v = _qkv(1, 2, 32, 600, 32)
    out = layers.attention(q, k, v, 2)
    assert spy == [None]  # JAX chooses the kernel
    assert _max(out, layers.attention(q, k, v, 2, implementation='blockwise')) < VAL_TOL


def _random(module, *args, seed=0, method=None):
    return random_params(abstract_params(module, *args, method=method), seed=seed)


def _both(monkeypatch, spy, fn, *args):
    """Jitted fn(*args) on CPU's paths, then with the backend reported as an accelerator (a
    new function object each time: jit's trace cache is keyed on it). Arrays are passed as
    arguments, not closed over, so XLA does not constant-fold the whole computation."""
    cpu = jax.tree.map(np.asarray, jax.jit(lambda *a: fn(*a))(*args))
    assert spy == []
    monkeypatch.setattr(layers, 'fused_by_default', lambda: True)
    fused = jax.tree.map(np.asarray, jax.jit(lambda *a: fn(*a))(*args))
    monkeypatch.undo()
    assert spy, 'the call site did not reach jax.nn.dot_product_attention'
    return cpu, fused


@pytest.fixture(scope='module')
def cfg():
    return load_config('tiny').model


@pytest.mark.slow
def test_unet_transformer_call_site(monkeypatch, spy):
    from vd_jax.models.unet import SpatialTransformer
    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((2, 24, 24, 64)), jnp.float32)  # 576 tokens: blockwise on CPU
    ctx = jnp.asarray(g.standard_normal((2, 7, 32)), jnp.float32)
    m = SpatialTransformer(64, 2, 32)
    p = _random(m, x, ctx)

    def run(p, x, ctx):
        return m.apply({'params': p}, x, ctx), jax.grad(
            lambda p: jnp.sum(m.apply({'params': p}, x, ctx) ** 2))(p)
    (cpu, gcpu), (fused, gfused) = _both(monkeypatch, spy, run, p, x, ctx)
    assert _max(cpu, fused) < MODULE_TOL
    # parameter gradients of a sum of squares over 2x576x64 outputs: relative to their size
    gscale = max(float(np.abs(a).max()) for a in jax.tree.leaves(gcpu))
    assert max(jax.tree.leaves(jax.tree.map(_max, gcpu, gfused))) < 1e-5 * gscale
    # the explicit field value takes the same path
    explicit = jax.jit(SpatialTransformer(64, 2, 32, attention='fused').apply)({'params': p}, x, ctx)
    assert _max(explicit, fused) < MODULE_TOL


@pytest.mark.slow
def test_diffuser_attention_field_reaches_every_context_block(cfg, spy):
    from vd_jax.models.unet import Diffuser
    x, t, c = jnp.zeros((1, 8, 8, 4)), jnp.array([3]), jnp.zeros((1, 7, 32))
    for attention, n in (('auto', 0), ('dense', 0), ('blockwise', 0), ('fused', None)):
        m = Diffuser(cfg.diffuser, attention=attention)
        spy.clear()
        jax.eval_shape(lambda m=m: m.init(jax.random.PRNGKey(0), x, t, c, 'image', 'text'))
        # tiny image stream: 4 context blocks (2 down, 1 middle, 2 up...), self + cross each
        assert (len(spy) == n) if n is not None else len(spy) >= 8, (attention, len(spy))


@pytest.mark.slow
def test_clip_call_sites(cfg, monkeypatch, spy):
    from vd_jax.models import family
    from vd_jax.tokenizers import clip_tokenizer
    ids = jnp.asarray(clip_tokenizer()(['a red bicycle', 'two cats on a sofa']))
    tm = family('clip_text').build(cfg.ctx.text)
    tp = _random(tm, ids, seed=1)
    s = cfg.ctx.image.image_size
    px = jnp.asarray(np.random.default_rng(2).standard_normal((2, s, s, 3)), jnp.float32)
    im = family('clip_vision').build(cfg.ctx.image)
    ip = _random(im, px, seed=2)
    cpu, fused = _both(monkeypatch, spy, lambda tp, ip, ids, px: (
        tm.apply({'params': tp}, ids)[0], im.apply({'params': ip}, px)[0]), tp, ip, ids, px)
    for a, b in zip(cpu, fused):
        assert _max(a, b) < MODULE_TOL


def test_vae_attnblock_call_site(monkeypatch, spy):
    from vd_jax.models.vae import AttnBlock
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 64)), jnp.float32)
    m = AttnBlock(64)
    p = _random(m, x, seed=4)
    cpu, fused = _both(monkeypatch, spy, lambda p, x: m.apply({'params': p}, x), p, x)
    assert _max(cpu, fused) < MODULE_TOL


@pytest.mark.slow
def test_optimus_call_sites(cfg, monkeypatch, spy):
    from vd_jax.models.optimus import Optimus
    m = Optimus(cfg.vae.text)
    p = random_params(abstract_params(m), seed=5)
    ids = np.random.default_rng(5).integers(1000, 28000, (2, 12))
    ids[:, 0], ids[0, -1], ids[1, 7], ids[1, 8:] = 101, 102, 102, 0  # second row padded
    gpt = np.random.default_rng(6).integers(0, 50000, (2, 9))

    def run(p, ids, gpt):
        mu, _ = m.apply({'params': p}, ids, method=Optimus.encode)
        return mu, m.apply({'params': p}, gpt, mu, method=Optimus.decode_logits)
    cpu, fused = _both(monkeypatch, spy, run, p, jnp.asarray(ids), jnp.asarray(gpt))
    for a, b in zip(cpu, fused):
        assert _max(a, b) < MODULE_TOL * max(1.0, float(np.abs(a).max()))
