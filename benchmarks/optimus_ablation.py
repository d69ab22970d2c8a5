"""Fast proxy of VD-mini's Optimus stage, for ablations of its recipe (beta, free bits, latent
size, a deterministic warm-up, learning rate) on a busy 2-core CPU.

Same network (configs/vd_mini.py), data (training captions of the shapes world), loss
(`vd_jax.train.objectives.Optimus`: summed token NLL of the teacher-forced GPT-2 on a posterior
sample + beta x KL with free bits and a linear beta warm-up), optimizer (AdamW, warm-up +
cosine to 0.1 lr, clip 50) and EMA (0.99) as `configs/train_vd_mini.py:optimus`, with ONE
difference: the decoder's softmax runs over the world's own GPT-2 tokens (the ~60 its captions
use, plus <EOS>) instead of all 50,260. That is 700x less work in the output layer, which is
most of a training step; tokens outside the world get no probability in either case once
trained, so the latent's job (tell the decoder which caption) is the same. Greedy decoding for
the gate is restricted the same way. The proxy's fidelity is measured, not assumed: its
run with the recipe's settings is compared with the shipped Optimus (docs/vd-mini.md).

    PYTHONPATH=$PWD python benchmarks/optimus_ablation.py --out OUT.json [--steps 2000]
        [--beta 0.05] [--free-bits 1.0] [--kl-warmup 1000] [--latent 32] [--lr 1e-3]
        [--deterministic-steps 0] [--batch 64] [--eval-every 500] [--seed 0]

Prints and writes {settings, wall seconds, curve: [{step, loss, token_accuracy, kl}],
gates: {step: optimus gate numbers (vd_jax.eval.gates.optimus_gate) + KL / active units}}.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from configs import vd_mini
from vd_jax.data import shapes as W
from vd_jax.eval import gates
from vd_jax.models.optimus import Optimus
from vd_jax.text_io import tokenize_for_encoder
from vd_jax.tokenizers import bert_tokenizer, gpt2_tokenizer
from vd_jax.train.objectives import decoder_ids
from vd_jax.train.optim import ema_decay_at


def world_tokens(gpt2, cfg):
    """Sorted GPT-2 ids of every word of every caption of the world, + <EOS>."""
    caps = [W.caption(a, t) for a in W.ALL_COMBINATIONS[::7] for t in range(len(W.TEMPLATES))]
    caps += [W.caption(W.Attributes(s, c, b, z, p), 0) for s in W.SHAPES for c in W.COLOURS
             for b in W.BACKGROUNDS for z in W.SIZES for p in list(W.POSITIONS)[:1]]
    caps += [W.caption(W.Attributes('circle', c, 'white', 'small', p), t) for c in W.COLOURS
             for p in W.POSITIONS for t in range(len(W.TEMPLATES))]
    ids = set(decoder_ids(caps, gpt2, cfg).ravel().tolist()) - {cfg.pad_id, cfg.bos_id}
    return np.array(sorted(ids), np.int32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--warmup', type=int, default=200)
    p.add_argument('--beta', type=float, default=0.05)
    p.add_argument('--free-bits', type=float, default=1.0)
    p.add_argument('--kl-warmup', type=int, default=1000)
    p.add_argument('--latent', type=int, default=vd_mini.LATENT_TEXT)
    p.add_argument('--deterministic-steps', type=int, default=0,
                   help='first N steps: z = mu (no posterior noise) and no KL term')
    p.add_argument('--clip', type=float, default=50.0)
    p.add_argument('--eval-every', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    t_start = time.time()
    section = dict(vd_mini.sections()['optimus'], latent_size=a.latent)
    model = Optimus(section)
    cfg = model.config
    bert, gpt2 = bert_tokenizer(), gpt2_tokenizer()
    vocab = world_tokens(gpt2, cfg)
    remap = np.full(cfg.decoder.vocab_size, -1, np.int32)
    remap[vocab] = np.arange(len(vocab))
    params = nn.unbox(model.init(jax.random.PRNGKey(a.seed), 1, method='init_all')['params'])
    sched = optax.join_schedules([optax.linear_schedule(0.0, a.lr, a.warmup),
                                  optax.cosine_decay_schedule(a.lr, max(a.steps - a.warmup, 1), 0.1)],
                                 [a.warmup])
    opt = optax.chain(optax.clip_by_global_norm(a.clip), optax.adamw(sched, weight_decay=0.0))
    state = opt.init(params)
    ema = params
    sub = jnp.asarray(vocab)

    def hidden(m, ids, z):
        dec = m.decoder
        cache = dec.init_cache(z, ids.shape[0], ids.shape[1] + 1)
        return dec.transformer(ids, cache)[0]

    def logits_of(prm, ids, z):
        h = model.apply({'params': prm}, ids, z, method=hidden)
        wte = prm['decoder']['transformer']['wte']['embedding'][sub]
        return h @ wte.T                                     # (B, T, |world vocab|)

    def loss_fn(prm, enc, dec, key, step):
        mu, logvar = model.apply({'params': prm}, enc, method='encode')
        stochastic = (step >= a.deterministic_steps).astype(jnp.float32)
        z = mu + stochastic * jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        logits = logits_of(prm, dec[:, :-1], z)
        target = jnp.asarray(remap)[dec[:, 1:]]
        mask = (dec[:, 1:] != cfg.pad_id).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], -1)[..., 0]
        rec = jnp.sum(nll * mask, 1).mean()
        kl_dim = 0.5 * (mu ** 2 + jnp.exp(logvar) - 1.0 - logvar).mean(0)
        kl = jnp.sum(jnp.maximum(kl_dim, a.free_bits))
        beta = stochastic * a.beta * jnp.minimum(
            1.0, (step - a.deterministic_steps + 1.0) / max(a.kl_warmup, 1))
        acc = jnp.sum((jnp.argmax(logits, -1) == target) * mask) / mask.sum()
        return rec + beta * kl, (rec, jnp.sum(kl_dim), acc)

    @jax.jit
    def train_step(prm, st, em, enc, dec, key, step):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(prm, enc, dec, key, step)
        upd, st = opt.update(g, st, prm)
        prm = optax.apply_updates(prm, upd)
        d = ema_decay_at(0.99, True, step)
        em = jax.tree_util.tree_map(lambda e, q: d * e + (1 - d) * q, em, prm)
        return prm, st, em, loss, aux

    encode = jax.jit(lambda prm, x: model.apply({'params': prm}, x, method='encode'))

    @jax.jit
    def greedy(prm, z):
        n = cfg.max_length - 1
        ids = jnp.full((z.shape[0], n), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.bos_id)

        def body(i, ids):
            nxt = sub[jnp.argmax(logits_of(prm, ids, z)[:, i], -1)]
            return ids.at[:, i + 1].set(nxt)
        return jax.lax.fori_loop(0, n - 1, body, ids)

    def roundtrip(prm, caps):
        mu = encode(prm, tokenize_for_encoder(caps, bert, cfg))[0]
        out = []
        for row in np.asarray(greedy(prm, mu)):
            body = []
            for t in row[1:]:
                if t in (cfg.eos_id, cfg.pad_id):
                    break
                body.append(int(t))
            out.append(gpt2.decode(body).strip())
        return out

    def evaluate(prm):
        rec = gates.optimus_gate(lambda caps: roundtrip(prm, caps))
        caps = [W.caption(x, t) for x in W.HELDOUT_COMBINATIONS for t in range(6)]
        mu, logvar = (np.asarray(v) for v in encode(prm, tokenize_for_encoder(caps, bert, cfg)))
        kl = 0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar).mean(0)
        return dict(accuracy=rec['numbers']['accuracy'], passed=rec['passed'],
                    per_template_all={t: v['all'] for t, v in
                                      rec['numbers']['per_template'].items()},
                    exact=rec['numbers']['exact'], kl_total=round(float(kl.sum()), 2),
                    active_units=int((mu.var(0) > 0.01).sum()),
                    sigma_mean=round(float(np.exp(0.5 * logvar).mean()), 4),
                    mu_std=round(float(mu.std()), 4), example=rec['examples'][1])

    # every training caption tokenized once; batches are draws of `W.iterate('train')`
    train_caps = [W.caption(x, t) for x in W.TRAIN_COMBINATIONS for t in range(len(W.TEMPLATES))]
    row = {c: i for i, c in enumerate(train_caps)}
    enc_all = tokenize_for_encoder(train_caps, bert, cfg)
    dec_all = decoder_ids(train_caps, gpt2, cfg)
    stream = W.iterate('train', a.seed)
    curve, gate_at = [], {}
    key = jax.random.PRNGKey(a.seed + 1)
    t_train = time.time()
    for step in range(a.steps):
        idx = [row[next(stream).caption] for _ in range(a.batch)]
        enc, dec = enc_all[idx], dec_all[idx]
        params, state, ema, loss, (rec, kl, acc) = train_step(
            params, state, ema, enc, dec, jax.random.fold_in(key, step), jnp.int32(step))
        if (step + 1) % 50 == 0:
            curve.append(dict(step=step + 1, loss=round(float(loss), 3),
                              recon=round(float(rec), 3), kl=round(float(kl), 2),
                              token_accuracy=round(float(acc), 4)))
            print(json.dumps(curve[-1]), flush=True)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            gate_at[step + 1] = evaluate(ema)
            print(step + 1, json.dumps(gate_at[step + 1]), flush=True)
    out = dict(settings=vars(a), world_vocab=len(vocab),
               train_seconds=round(time.time() - t_train, 1),
               wall_seconds=round(time.time() - t_start, 1), curve=curve, gates=gate_at)
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ('world_vocab', 'train_seconds', 'wall_seconds')}))


if __name__ == '__main__':
    main()
