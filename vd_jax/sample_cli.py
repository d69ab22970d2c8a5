"""The sampling command line (`python sample.py ...`): flags -> pipeline -> files on disk.

Every run writes into a new `OUT/run-NNN/` folder (earlier runs are never overwritten):
one PNG per image, `grid.png`, `texts.json`/`texts.txt` for text outputs, and
`settings.json` with every setting, the checkpoint and the code version.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

import numpy as np

TASKS = {'t2i': 'text_to_image', 'i2i': 'image_variation', 'i2t': 'image_to_text',
         't2t': 'text_variation', 'dual': 'dual_guided', 'multi': 'multi_context',
         'disentangle': 'disentangle', 'i2t2i': 'i2t2i'}
DEFAULT_PROMPT = 'a red bicycle leaning against a brick wall'
UNTRAINED = ('UNTRAINED MODEL: no --ckpt given, so this runs the tiny config with random '
             'weights. The outputs are noise; this run only proves that the install works.')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sample.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', help='vd_jax checkpoint folder (python -m vd_jax.convert ...); '
                                  'omit for an untrained tiny smoke run')
    p.add_argument('--config', default='tiny', help='config of the untrained run without --ckpt')
    p.add_argument('--task', default='t2i', choices=sorted(TASKS), help='what to run (default t2i)')
    p.add_argument('--prompt', action='append', default=[], help='a prompt (repeatable)')
    p.add_argument('--prompts', help='a text file with one prompt per line')
    p.add_argument('--image', action='append', default=[], help='an input image file (repeatable)')
    p.add_argument('--images', help='a text file with one image path per line')
    p.add_argument('--n', type=int, default=4, help='samples per input (default 4)')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--scale', type=float, default=7.5, help='classifier-free guidance scale')
    p.add_argument('--sampler', default='ddim', choices=['ddim', 'ddpm', 'dpm++'])
    p.add_argument('--eta', type=float, default=0.0, help='DDIM eta')
    p.add_argument('--seed', type=int, default=0, help='sample i uses seed + i')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--height', type=int)
    p.add_argument('--width', type=int)
    p.add_argument('--batch-size', type=int, default=8, help='samples per compiled call')
    p.add_argument('--out', default='samples', help='output root; each run gets a new run-NNN folder')
    p.add_argument('--uncond', default='v1.0', choices=['v1.0', 'legacy', 'diffusers'],
                   help='unconditional-context convention')
    p.add_argument('--negative', default='', help='negative prompt (t2i; i2t2i: what to remove)')
    p.add_argument('--positive', default='', help='i2t2i: what to add')
    p.add_argument('--mix', type=float, default=0.5, help='dual: text strength in [0, 1]')
    p.add_argument('--level', default='attention', choices=['attention', 'layer', 'model'],
                   help='dual: mixing level')
    p.add_argument('--focus', type=float, default=None,
                   help='i2i/dual/multi/disentangle: style-semantic focus in [0, 1] (0.5 = off)')
    p.add_argument('--dislevel', type=int, default=None, choices=[-2, -1, 0, 1, 2],
                   help='disentangle: the paper/CLI levels -2..2')
    p.add_argument('--fidelity', type=float, default=0.0, help='i2i: start from the input (0..1)')
    p.add_argument('--color-adjust', action='store_true', help='i2i: match input colours')
    p.add_argument('--strength', type=float, action='append', default=[],
                   help='multi: strength of each --image (repeatable, in order)')
    p.add_argument('--mask', action='append', default=[],
                   help="multi: a keep-mask image per --image, in order (white = use), or 'none'")
    p.add_argument('--decode', default='sample', choices=['sample', 'greedy', 'beam'],
                   help='text outputs: Optimus decoding (the original samples)')
    p.add_argument('--temperature', type=float, default=1.0)
    return p


def _read_list(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: {what} list file '{path}' does not exist")
    with open(path) as f:
        return [l.strip() for l in f if l.strip()]


def _smoke_image(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return np.stack([x, y, 1 - x * y], -1).astype(np.float32)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    from tqdm import tqdm

    from vd_jax.checkpoint import CheckpointError
    from vd_jax.image_io import ImageReadError, load_image
    from vd_jax.outputs import code_version, new_run_dir, write_results
    from vd_jax.pipeline import TaskError, VersatileDiffusion

    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise SystemExit('error: --n, --steps and --batch-size must be >= 1')
    prompts = list(args.prompt) + (_read_list(args.prompts, 'prompt') if args.prompts else [])
    image_paths = list(args.image) + (_read_list(args.images, 'image') if args.images else [])
    try:
        t0 = time.time()
        if args.ckpt:
            vd = VersatileDiffusion.from_checkpoint(args.ckpt, dtype=args.dtype, uncond=args.uncond)
        else:
            print(UNTRAINED, file=sys.stderr)
            vd = VersatileDiffusion.random(args.config, dtype=args.dtype, uncond=args.uncond)
        task = TASKS[args.task]
        vd.check_task(task)
        images, labels = [], []
        for p in image_paths:
            images.append(load_image(p))
        needs_image = args.task in ('i2i', 'i2t', 'dual', 'multi', 'disentangle', 'i2t2i')
        needs_prompt = args.task in ('t2i', 't2t', 'dual')
        if needs_image and not images:
            if args.ckpt:
                raise TaskError(f'--task {args.task} needs an input image (--image FILE)')
            images, image_paths = [_smoke_image()], ['<synthetic gradient>']
        if needs_prompt and not prompts:
            prompts = [DEFAULT_PROMPT]
        print(f'loaded {vd.source} in {time.time() - t0:.1f}s; devices: {jax.devices()}',
              file=sys.stderr)

        common = dict(steps=args.steps, scale=args.scale, sampler=args.sampler, eta=args.eta)
        img_kw = dict(height=args.height, width=args.width)
        out_images = out_texts = None
        bar = tqdm(total=0, unit='step', desc=args.task, file=sys.stderr)

        def progress(done, total):
            bar.update(done - progress.last)
            progress.last = done
        progress.last = 0

        def batched(inputs, labels_of, call):
            """inputs x n in batches of --batch-size; seeds continue across batches."""
            items = [(x, l) for x, l in zip(inputs, labels_of) for _ in range(args.n)]
            outs = []
            nb = -(-len(items) // args.batch_size)
            bar.reset(total=nb * args.steps)
            for k in range(nb):
                chunk = items[k * args.batch_size:(k + 1) * args.batch_size]
                pad = args.batch_size - len(chunk) if nb > 1 else 0
                chunk_in = [x for x, _ in chunk] + [chunk[-1][0]] * pad  # same shapes: no recompile
                progress.last = 0
                bar.set_description(f'{args.task} batch {k + 1}/{nb}')
                res = call(chunk_in, args.seed + k * args.batch_size)
                outs.extend(list(res)[:len(chunk)])
                labels.extend(l for _, l in chunk)
            return outs

        if args.task == 't2i':
            out_images = np.stack(batched(prompts, prompts, lambda x, s: vd.text_to_image(
                x, 1, seed=s, negative_prompt=args.negative, progress=progress, **common, **img_kw)))
        elif args.task == 'i2i':
            out_images = np.stack(batched(images, image_paths, lambda x, s: vd.image_variation(
                x, 1, seed=s, fidelity=args.fidelity, focus=0.5 if args.focus is None else args.focus,
                color_adjust=args.color_adjust, progress=progress, **common, **img_kw)))
        elif args.task == 'i2t':
            out_texts = batched(images, image_paths, lambda x, s: vd.image_to_text(
                x, 1, seed=s, decode=args.decode, temperature=args.temperature, progress=progress,
                **common))
        elif args.task == 't2t':
            out_texts = batched(prompts, prompts, lambda x, s: vd.text_variation(
                x, 1, seed=s, decode=args.decode, temperature=args.temperature, progress=progress,
                **common))
        else:
            bar.reset(total=args.steps * (2 if args.task == 'i2t2i' else 1))
            if args.task == 'dual':
                out_images = vd.dual_guided(prompts[0], images[0], args.n, mix=args.mix,
                                            level=args.level, progress=progress,
                                            focus=0.5 if args.focus is None else args.focus,
                                            **common, **img_kw)
            elif args.task == 'multi':
                masks = None
                if args.mask:
                    if len(args.mask) != len(images):
                        raise TaskError(f'{len(args.mask)} --mask for {len(images)} --image')
                    masks = [None if m.lower() == 'none' else load_image(m) for m in args.mask]
                out_images = vd.multi_context(images, args.strength or None,
                                              prompts[0] if prompts else None, args.n,
                                              text_strength=args.mix, masks=masks,
                                              progress=progress,
                                              focus=0.5 if args.focus is None else args.focus,
                                              **common, **img_kw)
            elif args.task == 'disentangle':
                focus = args.focus if args.dislevel is None else None
                if focus is None and args.dislevel is None:
                    focus = 1.0
                out_images = vd.disentangle(images[0], args.n, focus=focus, level=args.dislevel,
                                            progress=progress, **common, **img_kw)
            else:
                out_texts, out_images = vd.i2t2i(images[0], args.positive, args.negative, args.n,
                                                 progress=progress, **common, **img_kw)
            labels = [args.task] * args.n
        bar.close()
    except (TaskError, CheckpointError, ImageReadError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    out_dir = new_run_dir(args.out)
    settings = dict(vars(args), task_name=task, prompts=prompts, image_files=image_paths,
                    checkpoint=vd.source, untrained=not args.ckpt, code_version=code_version(),
                    jax_version=jax.__version__, backend=jax.default_backend(),
                    seconds=round(time.time() - t0, 2))
    inputs = None
    if images and out_images is not None and args.task in ('i2i', 'disentangle', 'dual'):
        from vd_jax.pipeline import _resize01
        inputs = np.stack([_resize01(im, out_images.shape[1:3]) for im in images[:1]])
    written = write_results(out_dir, settings, images=out_images, texts=out_texts, labels=labels,
                            inputs=inputs)
    n_img = len(written['images'])
    print(f"wrote {out_dir}: {n_img} image(s){', grid.png' if written['grid'] else ''}"
          f"{', texts.json/texts.txt' if written['texts'] else ''}, settings.json")
    if out_texts:
        for t in out_texts:
            print(f'  {t}')
    if not args.ckpt:
        print(UNTRAINED)
    return 0
