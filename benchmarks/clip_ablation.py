"""Short CLIP-stage ablation on the shapes world: continue training the shipped VD-mini CLIP
towers with the stage's own loss (`vd_jax.train.objectives.CLIP`:
symmetric InfoNCE over the batch) and a given batch size, then measure the CLIP gate
(`vd_jax.eval.gates.clip_gate`). Question it answers: does a larger batch (more in-batch
negatives, so more of them one attribute away) lift the one-attribute-neighbour ranking that
the shipped towers fail on (position: 'bottom' vs 'bottom right')?

    PYTHONPATH=$PWD python benchmarks/clip_ablation.py --out OUT.json --batch 256 --steps 300
        [--lr 3e-4] [--logit-scale 100] [--seed 0]

Optimizer: AdamW (no decay), linear warm-up over 10% of the steps then constant, clip 1
(configs/train_vd_mini.py's CLIP stage uses AdamW 1e-3, clip 1, cosine; a continuation uses a
smaller lr). Images are the world's renders, captions drawn as `W.iterate('train')` does.
"""
import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax.data import shapes as W
from vd_jax.eval import gates
from vd_jax.eval.clip_score import CLIPScorer
from vd_jax.pipeline import MODELS
from vd_jax.train.objectives import CLIP


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--lr', type=float, default=3e-4)
    p.add_argument('--logit-scale', type=float, default=100.0,
                   help='initial exp(logit_scale) for a continuation (the export drops it)')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    t0 = time.time()
    c = gates.components_of(MODELS['vd-mini'], ['ctx_text', 'ctx_image'])
    obj = CLIP(text=c.module('ctx_text'), vision=c.module('ctx_image'))
    params = {'ctx_text': c.params['ctx_text'], 'ctx_image': c.params['ctx_image'],
              'logit_scale': jnp.float32(math.log(a.logit_scale))}
    tok = c.tokenizer('clip')
    sched = optax.join_schedules([optax.linear_schedule(0.0, a.lr, max(a.steps // 10, 1)),
                                  optax.constant_schedule(a.lr)], [max(a.steps // 10, 1)])
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    state = opt.init(params)

    @jax.jit
    def step_fn(prm, st, batch, step):
        (loss, aux), g = jax.value_and_grad(obj.loss, has_aux=True)(prm, batch, None, step)
        upd, st = opt.update(g, st, prm)
        return optax.apply_updates(prm, upd), st, loss, aux['accuracy']

    combos = W.TRAIN_COMBINATIONS
    images = {x: W.render(x).astype(np.float32) / 127.5 - 1.0 for x in combos}
    stream = W.iterate('train', a.seed)

    def measure(prm):
        sc = CLIPScorer(prm['ctx_text'], prm['ctx_image'], c.config['ctx']['text'],
                        c.config['ctx']['image'], batch_size=256)
        return gates.clip_gate(sc.text_embeds, sc.image_embeds)['numbers']

    out = dict(settings=vars(a), before=measure(params), curve=[])
    t_train = time.time()
    for step in range(a.steps):
        samples = [next(stream) for _ in range(a.batch)]
        batch = {'image': jnp.asarray(np.stack([images[s.attrs] for s in samples])),
                 'tokens_clip': jnp.asarray(tok([s.caption for s in samples]))}
        params, state, loss, acc = step_fn(params, state, batch, jnp.int32(step))
        if (step + 1) % 50 == 0:
            out['curve'].append(dict(step=step + 1, loss=round(float(loss), 4),
                                     accuracy=round(float(acc), 4)))
            print(json.dumps(out['curve'][-1]), flush=True)
    out['train_seconds'] = round(time.time() - t_train, 1)
    out['after'] = measure(params)
    out['wall_seconds'] = round(time.time() - t0, 1)
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ('before', 'after', 'train_seconds', 'wall_seconds')}))


if __name__ == '__main__':
    main()
