"""How well a Versatile Diffusion trained on the shapes world does every flow, on held-out data.

Held-out prompts and images (`vd_jax.data.shapes`, combinations never seen in training) go
through each flow; generated images are read back from their pixels and generated captions
parsed (`vd_jax.eval.shapes_reader`), and compared with the attributes asked for:

  t2i           text -> image: each attribute and all five
  i2t           image -> text: each attribute of the caption and all five
  i2i           image variation: attributes preserved (shape + colour is the headline)
  t2t           text variation: attributes preserved
  dual          image + prompt with different attributes, attention mix 0 / 0.5 / 1: for each
                attribute, the share of outputs that follow the image and the prompt
  guidance      text -> image accuracy at guidance scales 1 / 3 / 7.5
  autokl        the image VAE alone: attributes read from decode(encode(image))
  optimus       the text VAE alone: attributes parsed from decode(encode(caption)) (greedy)
  clip          the CLIP towers alone: for each held-out image, is its own caption the
                most similar among all held-out captions (top-1), and per attribute

`evaluate` returns a JSON-able record; grids (PNG, with the settings in the metadata) go into
`out_dir`. Every sample is seeded (sample i: seed + i), so a run is reproducible.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from vd_jax.batching import map_batched
from vd_jax.data import shapes as W
from vd_jax.errors import InputError
from vd_jax.eval.shapes_reader import attribute_accuracy, parse_caption, read_images
from vd_jax.outputs import make_grid, save_png

FLOWS = ('t2i', 'i2t', 'i2i', 't2t', 'dual', 'guidance')
PARTS = ('autokl', 'optimus', 'clip')


@dataclasses.dataclass
class EvalSettings:
    n: int = 200                 # held-out samples per flow
    steps: int = 50
    scale: Optional[float] = None  # None: the model's recommendation (vd.sampling_defaults)
    sampler: str = 'ddim'
    spacing: str = 'auto'
    karras: bool = False
    guidance_rescale: float = 0.0
    seed: int = 0
    batch_size: int = 100
    decode: str = 'greedy'       # Optimus decoding of text outputs
    scales: Sequence[float] = (1.0, 3.0, 7.5)
    mixes: Sequence[float] = (0.0, 0.5, 1.0)
    flows: Sequence[str] = FLOWS


def heldout(n: int, seed: int) -> List[W.Sample]:
    """The first n held-out samples (every held-out combination before any repeats)."""
    return W.sample('heldout', n, seed)


def _acc(pred, true) -> Dict[str, float]:
    return {k: round(float(v), 4) for k, v in attribute_accuracy(pred, true).items()}


def _grid(out_dir, name, images, settings):
    if out_dir is None:
        return None
    path = os.path.join(out_dir, f'{name}.png')
    if os.path.exists(path):
        os.remove(path)
    save_png(path, make_grid(np.asarray(images[:64], np.float32), cols=8), settings)
    return path


def evaluate(vd, settings: EvalSettings = EvalSettings(), out_dir: Optional[str] = None,
             log: Callable[[str], None] = print) -> Dict:
    """Run the shapes evaluation of `vd` (a `VersatileDiffusion`); returns the record."""
    s = settings
    if s.scale is None:
        s = dataclasses.replace(s, scale=float(vd.sampling_defaults['scale']))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    data = heldout(s.n, s.seed)
    prompts = [d.caption for d in data]
    truth = [d.attrs for d in data]
    images = np.stack([W.render(a) for a in truth]).astype(np.float32) / 255.0
    kw = dict(steps=s.steps, sampler=s.sampler, spacing=s.spacing, karras=s.karras,
              guidance_rescale=s.guidance_rescale)
    rec: Dict = {'settings': dataclasses.asdict(s), 'model': vd.source, 'flows': {}}
    rec['settings']['scales'] = list(s.scales)
    rec['settings']['mixes'] = list(s.mixes)
    rec['settings']['flows'] = list(s.flows)
    have = {t for t in ('text_to_image', 'image_to_text', 'image_variation', 'text_variation',
                        'dual_guided') if _can(vd, t)}

    def timed(name, fn):
        t0 = time.time()
        r = fn()
        r['seconds'] = round(time.time() - t0, 1)
        rec['flows'][name] = r
        log(f'{name}: ' + json.dumps({k: v for k, v in r.items() if k != 'examples'}))

    def t2i(scale):
        out = map_batched(lambda p, sd: vd.text_to_image(p, 1, seed=sd, scale=scale, **kw),
                       prompts, s.batch_size, s.seed)
        return np.stack(out)

    if 't2i' in s.flows and 'text_to_image' in have:
        def run():
            out = t2i(s.scale)
            _grid(out_dir, 't2i', out, dict(flow='t2i', prompts=prompts[:64], **kw, scale=s.scale))
            return dict(accuracy=_acc(read_images(out), truth), scale=s.scale)
        timed('t2i', run)
    if 'guidance' in s.flows and 'text_to_image' in have:
        def run():
            res = {}
            for sc in s.scales:
                out = t2i(sc) if sc != s.scale or 't2i' not in s.flows else None
                acc = _acc(read_images(out), truth) if out is not None \
                    else rec['flows']['t2i']['accuracy']
                res[str(sc)] = acc
            return dict(accuracy_by_scale=res)
        timed('guidance', run)
    if 'i2t' in s.flows and 'image_to_text' in have:
        def run():
            texts = map_batched(lambda x, sd: vd.image_to_text(np.stack(x), 1, seed=sd, scale=s.scale,
                                                             decode=s.decode, **kw),
                             list(images), s.batch_size, s.seed)
            _grid(out_dir, 'i2t_inputs', images, dict(flow='i2t', captions=texts[:64]))
            return dict(accuracy=_acc([parse_caption(t) for t in texts], truth),
                        examples=[[p, t] for p, t in zip(prompts[:8], texts[:8])])
        timed('i2t', run)
    if 'i2i' in s.flows and 'image_variation' in have:
        def run():
            out = np.stack(map_batched(lambda x, sd: vd.image_variation(
                np.stack(x), 1, seed=sd, scale=s.scale, **kw), list(images), s.batch_size, s.seed))
            pred = read_images(out)
            _grid(out_dir, 'i2i', np.concatenate([images[:32], out[:32]]), dict(flow='i2i', **kw))
            acc = _acc(pred, truth)
            sc = np.mean([p.shape == t.shape and p.colour == t.colour for p, t in zip(pred, truth)])
            return dict(preserved=acc, shape_and_colour=round(float(sc), 4))
        timed('i2i', run)
    if 't2t' in s.flows and 'text_variation' in have:
        def run():
            texts = map_batched(lambda p, sd: vd.text_variation(p, 1, seed=sd, scale=s.scale,
                                                              decode=s.decode, **kw),
                             prompts, s.batch_size, s.seed)
            return dict(preserved=_acc([parse_caption(t) for t in texts], truth),
                        examples=[[p, t] for p, t in zip(prompts[:8], texts[:8])])
        timed('t2t', run)
    if 'dual' in s.flows and 'dual_guided' in have:
        timed('dual', lambda: _dual(vd, s, data, images, kw, out_dir))
    c = vd.components
    if 'autokl' in s.flows and 'vae_image' in vd.params:
        def run():
            rec_img = np.concatenate([c.decode_latent('image', c.encode_latent('image', images[k:k + 100]))
                                      for k in range(0, len(images), 100)])
            return dict(accuracy=_acc(read_images(rec_img), truth),
                        mean_abs_error=round(float(np.abs(rec_img - images).mean()), 5))
        timed('autokl', run)
    if 'optimus' in s.flows and 'vae_text' in vd.params:
        def run():
            texts = []
            for k in range(0, len(prompts), 100):
                z = c.encode_latent('text', prompts[k:k + 100])
                texts += c.decode_latent('text', z, method='greedy')
            exact = np.mean([t.strip() == p.strip() for t, p in zip(texts, prompts)])
            return dict(accuracy=_acc([parse_caption(t) for t in texts], truth),
                        exact=round(float(exact), 4),
                        examples=[[p, t] for p, t in zip(prompts[:4], texts[:4])])
        timed('optimus', run)
    if 'clip' in s.flows and {'ctx_text', 'ctx_image'} <= set(vd.params):
        def run():
            # lazy: vd_jax.eval.clip_score pulls in flax (+0.3 s)
            from vd_jax.eval.clip_score import CLIPScorer  # noqa: PLC0415
            sc = CLIPScorer(vd.params['ctx_text'], vd.params['ctx_image'], vd.config['ctx']['text'],
                            vd.config['ctx']['image'], batch_size=s.batch_size)
            t, i = sc.text_embeds(prompts), sc.image_embeds(images)
            t, i = t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1,
                                                                                  keepdims=True)
            best = np.argmax(i @ t.T, axis=1)
            return dict(accuracy=_acc([truth[j] for j in best], truth),
                        top1=round(float(np.mean(best == np.arange(len(best)))), 4))
        timed('clip', run)
    return rec


def _can(vd, task) -> bool:
    try:
        vd.check_task(task)
        return True
    except InputError:  # what the model lacks; a broken vocabulary file is raised
        return False


def _dual(vd, s: EvalSettings, data, images, kw, out_dir) -> Dict:
    """Image of sample i with the prompt of sample i + 1 (their attributes mostly differ):
    per mix, for every attribute where the two differ, the share of outputs that show the
    image's value and the share that show the prompt's."""
    n = min(len(data), max(s.n // 2, 8))
    pairs = [(images[i], data[(i + 1) % len(data)].caption, data[i].attrs,
              data[(i + 1) % len(data)].attrs) for i in range(n)]
    res = {}
    for mix in s.mixes:
        out = np.stack(map_batched(lambda ps, sd, mix=mix: vd.dual_guided(
            [p[1] for p in ps], np.stack([p[0] for p in ps]), 1, mix=mix,
            mix_level='attention', seed=sd, scale=s.scale, **kw), pairs, s.batch_size, s.seed))
        pred = read_images(out)
        follow = {}
        for f, field in enumerate(W.FIELDS):
            diff = [(p, a, b) for p, (_, _, a, b) in zip(pred, pairs) if a[f] != b[f]]
            follow[field] = {'image': round(float(np.mean([p[f] == a[f] for p, a, _ in diff])), 4),
                             'prompt': round(float(np.mean([p[f] == b[f] for p, _, b in diff])), 4)
                             } if diff else None
        res[str(mix)] = follow
        _grid(out_dir, f'dual_mix{mix}', out, dict(flow='dual', mix=mix, **kw))
    return dict(follows=res, pairs=n)
