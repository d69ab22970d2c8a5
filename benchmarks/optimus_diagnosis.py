"""Why does an Optimus checkpoint not carry a caption? Measurements on the shapes world's
held-out captions (174 combinations x 6 templates), printed as JSON:

  kl_per_dim        batch-mean KL of each latent dimension (nats) and its total
  active_units      dims with Var_x(mu) > 0.01 (Burda et al.'s activity measure)
  mu_std / sigma    spread of the posterior means across captions / mean posterior std
  probe             nearest-centroid probe on mu (centroids from training captions): can each
                    attribute be read linearly from the latent? (encoder side)
  teacher_forced    per attribute word: decoder argmax accuracy at that word's token with
                    z = own mu, z = another caption's mu, z = 0 and z ~ N(0, 1); and the
                    teacher-forced NLL per caption for each (decoder side: is z used?)
  greedy            round-trip accuracy with z = mu and with z = a posterior sample

    PYTHONPATH=$PWD python benchmarks/optimus_diagnosis.py [CKPT]   (default: shipped VD-mini)
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.data import shapes as W
from vd_jax.eval.gates import components_of
from vd_jax.eval.shapes_reader import attribute_accuracy, parse_caption
from vd_jax.text_io import tokenize_for_encoder
from vd_jax.train.objectives import decoder_ids


def main(ckpt):
    c = components_of(ckpt, ['vae_text'])
    model, params = c.module('vae_text'), c.params['vae_text']
    cfg = model.config
    bert, gpt2 = c.tokenizer('bert'), c.tokenizer('gpt2')
    items = [(a, t) for a in W.HELDOUT_COMBINATIONS for t in range(len(W.TEMPLATES))]
    caps = [W.caption(a, t) for a, t in items]
    enc = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))
    dec = jax.jit(lambda p, x, z: model.apply({'params': p}, x, z, method='decode_logits'))
    mu, logvar = (np.asarray(v) for v in enc(params, tokenize_for_encoder(caps, bert, cfg)))
    out = {'ckpt': ckpt}
    kl = 0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar).mean(0)
    out['kl_per_dim'] = [round(float(k), 3) for k in kl]
    out['kl_total'] = round(float(kl.sum()), 2)
    var = mu.var(0)
    out['active_units'] = int((var > 0.01).sum())
    out['mu_var_per_dim'] = [round(float(v), 4) for v in var]
    out['mu_std'] = round(float(mu.std()), 4)
    out['sigma_mean'] = round(float(np.exp(0.5 * logvar).mean()), 4)
    # probe: centroids of training captions' mu per attribute value
    rng = np.random.default_rng(0)
    train = W.sample('train', 3000, seed=1)
    tmu = np.asarray(enc(params, tokenize_for_encoder([s.caption for s in train], bert, cfg))[0])
    probe = {}
    for f, field in enumerate(W.FIELDS):
        labels = np.array([s.attrs.labels()[f] for s in train])
        cent = np.stack([tmu[labels == k].mean(0) for k in range(len(W.VOCAB[field]))])
        pred = np.argmin(((mu[:, None] - cent[None]) ** 2).sum(-1), 1)
        probe[field] = round(float(np.mean(pred == [a.labels()[f] for a, _ in items])), 4)
    out['probe_nearest_centroid'] = probe
    # teacher-forced
    ids = decoder_ids(caps, gpt2, cfg)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    mask = tgt != cfg.pad_id
    word_tokens = {}
    for field in W.FIELDS:
        words = {w for v in W.VOCAB[field] for w in v.split()}
        word_tokens[field] = {gpt2.encode(' ' + w, add_special_tokens=False)[0] for w in words}
    zs = {'own_mu': mu, 'other_mu': mu[rng.permutation(len(mu))], 'zero': np.zeros_like(mu),
          'random_normal': rng.standard_normal(mu.shape).astype(np.float32),
          'posterior_sample': mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)}
    tf = {}
    for name, z in zs.items():
        logits = np.asarray(dec(params, jnp.asarray(inp), jnp.asarray(z, jnp.float32)))
        logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
        nll = -np.take_along_axis(np.asarray(logp), tgt[..., None], -1)[..., 0]
        right = logits.argmax(-1) == tgt
        res = {'nll_per_caption': round(float((nll * mask).sum(1).mean()), 3),
               'token_accuracy': round(float(right[mask].mean()), 4)}
        for field, toks in word_tokens.items():
            # the field's value words (the 'background' of the background field's value word
            # excluded: it is a template word)
            at = np.isin(tgt, list(toks)) & mask
            res[field] = round(float(right[at].mean()), 4)
        tf[name] = res
    out['teacher_forced'] = tf
    greedy = {}
    for name in ('own_mu', 'posterior_sample'):
        texts = []
        for k in range(0, len(caps), 128):
            texts += c.decode_latent('text', jnp.asarray(zs[name][k:k + 128], jnp.float32)
                                     * model.latent_scale, method='greedy')
        greedy[name] = {k: round(v, 4) for k, v in attribute_accuracy(
            [parse_caption(t) for t in texts], [a for a, _ in items]).items()}
    out['greedy_roundtrip'] = greedy
    print(json.dumps(out, indent=1))


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'vd_jax/weights/vd_mini')
