"""The worked example of docs/lora.md: teach VD-mini a shape it has never seen.

  python -m vd_jax.lora.teach_shape render runs/star_renders --shape star --new 300 --old 300
  python train.py --config configs/train_lora_vd_mini.py --workdir runs/star \
      data.path=runs/star_renders lora.name=star
  python -m vd_jax.lora.teach_shape eval runs/star/export/step_600/star.safetensors --n 100

render   a folder of PNG renders with .txt captions: `--new` images of the new shape (one of
         `vd_jax.data.shapes.EXTRA_SHAPES`) in training combinations, and `--old` images of the
         world's training split (replayed so the rest of the world is not forgotten). A
         combination of the new shape is held out by the world's own rule with the new shape's
         index 4 (`is_heldout`): 43 of its 432 combinations are never rendered for training.
eval     text -> image with the adapter at scale 1 (and the base, for comparison), read back by
         the shapes reader extended to the new shape (`read_image(shapes=SHAPES + (shape,))`):
           new      prompts of held-out combinations of the new shape: share drawn as it
                    (also per asked size: shape_by_size);
           old      the world's held-out prompts (`vd_jax.eval.shapes_eval.heldout`): attribute
                    accuracy of the base and of the adapted model (same seeds);
         prints and writes a JSON record (and PNG grids with --out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from vd_jax.data import shapes as W
from vd_jax.outputs import make_grid, save_png

FIELDS_BUT_SHAPE = ('colour', 'background', 'size', 'position')


def _combos(shape: str, heldout: bool) -> List[W.Attributes]:
    """Every combination with the new shape, split by the world's rule (shape index 4+)."""
    idx = len(W.SHAPES) + W.EXTRA_SHAPES.index(shape)
    out = []
    for c, b, s, p in itertools.product(*(range(len(W.VOCAB[f])) for f in FIELDS_BUT_SHAPE)):
        held = (idx + c + 3 * b + 6 * s + p) % 10 == 0
        if held == heldout:
            out.append(W.Attributes(shape, *(W.VOCAB[f][i] for f, i in
                                             zip(FIELDS_BUT_SHAPE, (c, b, s, p)))))
    return out


def new_shape_samples(shape: str, split: str, n: int, seed: int = 0) -> List[W.Sample]:
    """n samples of the new shape: 'train' uniform draws of training combinations and
    templates; 'heldout' passes over the held-out combinations, templates cycling."""
    if shape not in W.EXTRA_SHAPES:
        raise ValueError(f'shape {shape!r} is not one of {W.EXTRA_SHAPES} (the world has '
                         f'{W.SHAPES} already)')
    combos = _combos(shape, split == 'heldout')
    rng = np.random.default_rng([seed, 7, 0 if split == 'train' else 1])
    out = []
    for i in range(n):
        if split == 'train':
            a, t = combos[int(rng.integers(len(combos)))], int(rng.integers(len(W.TEMPLATES)))
        else:
            if i % len(combos) == 0:
                order = rng.permutation(len(combos))
            a, t = combos[int(order[i % len(combos)])], (i + i // len(combos)) % len(W.TEMPLATES)
        out.append(W.Sample(a, t, W.caption_any(a, t)))
    return out


def render_folder(out: str, shape: str = 'star', new: int = 300, old: int = 300,
                  seed: int = 0) -> Dict[str, int]:
    """Write `new` renders of `shape` and `old` of the world's training split as
    `<out>/<kind>_<i>.png` + `.txt` (the image-folder layout train.py's data.kind=images reads)."""
    os.makedirs(out, exist_ok=True)
    items = [('new', s) for s in new_shape_samples(shape, 'train', new, seed)] + \
        [('old', s) for s in W.sample('train', old, seed)]
    for i, (kind, s) in enumerate(items):
        stem = os.path.join(out, f'{kind}_{i:05d}')
        Image.fromarray(W.render_any(s.attrs)).save(stem + '.png')
        with open(stem + '.txt', 'w') as f:
            f.write(s.caption + '\n')
    return {'new': new, 'old': old}


def _t2i(vd, prompts: Sequence[str], seed: int, steps: int, scale: float, batch: int):
    out = []
    for k in range(0, len(prompts), batch):
        chunk = list(prompts[k:k + batch])
        pad = batch - len(chunk) if len(prompts) > batch else 0   # one shape: one program
        imgs = vd.text_to_image(chunk + [chunk[-1]] * pad, n=1, seed=seed + k, steps=steps,
                                scale=scale, progress=False)
        out.extend(list(imgs)[:len(chunk)])
    return np.stack(out)


def evaluate(adapter: str, shape: str = 'star', n: int = 100, seed: int = 0, steps: int = 50,
             scale: Optional[float] = None, batch: int = 50, lora_scale: float = 1.0,
             out_dir: Optional[str] = None, model: str = 'vd-mini') -> Dict:
    """The example's numbers (see the module docstring); a JSON-able record. scale: the
    guidance scale (None: the base model's recommendation, `vd.sampling_defaults`)."""
    # lazy: vd_jax.eval.shapes_eval pulls in scipy, numpy (+0.3 s)
    from vd_jax.eval.shapes_eval import heldout  # noqa: PLC0415
    # lazy: vd_jax.eval.shapes_reader pulls in scipy, numpy (+0.2 s)
    from vd_jax.eval.shapes_reader import attribute_accuracy, read_images  # noqa: PLC0415
    # lazy: vd_jax.pipeline pulls in jax, flax (+0.2 s)
    from vd_jax.pipeline import VersatileDiffusion  # noqa: PLC0415
    t0 = time.time()
    vd = VersatileDiffusion.default(model)
    scale = float(vd.sampling_defaults['scale'] if scale is None else scale)
    kinds = W.SHAPES + (shape,)
    new = new_shape_samples(shape, 'heldout', n, seed)
    old = heldout(n, seed)
    rec: Dict = {'adapter': adapter, 'adapter_mb': round(os.path.getsize(adapter) / 1e6, 4),
                 'shape': shape, 'n': n, 'steps': steps, 'guidance': scale, 'seed': seed,
                 'lora_scale': lora_scale}
    images = {}

    def score(tag, samples):
        imgs = _t2i(vd, [s.caption for s in samples], seed, steps, scale, batch)
        images[tag] = imgs
        read = read_images(imgs, shapes=kinds)
        acc = attribute_accuracy(read, [s.attrs for s in samples])
        acc['mean5'] = float(np.mean([acc[f] for f in W.FIELDS]))
        shapes_read = [r.shape for r in read]
        acc['read_as'] = {k: shapes_read.count(k) / len(read) for k in kinds + (None,)
                          if shapes_read.count(k)}
        # the shape read back per asked size (the small ones are bounded by the AutoKL)
        acc['shape_by_size'] = {
            size: float(np.mean([r.shape == s.attrs.shape for r, s in zip(read, samples)
                                 if s.attrs.size == size]))
            for size in W.SIZES if any(s.attrs.size == size for s in samples)}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in acc.items()}

    rec['base'] = {'new': score('base_new', new), 'old': score('base_old', old)}
    vd.load_lora(adapter, scale=lora_scale, name='taught')
    rec['adapted'] = {'new': score('adapted_new', new), 'old': score('adapted_old', old)}
    rec['drawn_as_new_shape'] = rec['adapted']['new']['shape']
    rec['old_world_drop_points'] = {
        k: round(100 * (rec['base']['old'][k] - rec['adapted']['old'][k]), 1)
        for k in W.FIELDS + ('all', 'mean5')}
    rec['seconds'] = round(time.time() - t0, 1)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for tag, imgs in images.items():
            save_png(os.path.join(out_dir, f'{tag}.png'),
                     make_grid(np.asarray(imgs[:32], np.float32), cols=8), {'eval': tag})
        with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
            json.dump(rec, f, indent=1)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m vd_jax.lora.teach_shape', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('render', help='write the training renders (PNG + .txt)')
    r.add_argument('out')
    r.add_argument('--shape', default='star', choices=W.EXTRA_SHAPES)
    r.add_argument('--new', type=int, default=300, help='renders of the new shape')
    r.add_argument('--old', type=int, default=300, help="renders of the world's training split")
    r.add_argument('--seed', type=int, default=0)
    e = sub.add_parser('eval', help='measure an adapter (text -> image, read back)')
    e.add_argument('adapter')
    e.add_argument('--shape', default='star', choices=W.EXTRA_SHAPES)
    e.add_argument('--n', type=int, default=100, help='prompts of each set')
    e.add_argument('--steps', type=int, default=50)
    e.add_argument('--scale', type=float, default=None,
                   help="guidance (default: the base model's recommendation, VD-mini v3's 3)")
    e.add_argument('--lora-scale', type=float, default=1.0)
    e.add_argument('--seed', type=int, default=0)
    e.add_argument('--out', default=None, help='folder for eval.json and PNG grids')
    args = p.parse_args(argv)
    if args.cmd == 'render':
        print(render_folder(args.out, args.shape, args.new, args.old, args.seed))
        return 0
    if not os.path.isfile(args.adapter):
        print(f"error: adapter file '{args.adapter}' does not exist", file=sys.stderr)
        return 2
    rec = evaluate(args.adapter, args.shape, args.n, args.seed, args.steps, args.scale,
                   lora_scale=args.lora_scale, out_dir=args.out)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
