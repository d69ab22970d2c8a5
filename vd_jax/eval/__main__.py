"""Evaluation command line: `python -m vd_jax.eval <command> ...`.

  shapes     every flow of a model trained on the shapes world, on held-out prompts and images
             (attribute accuracy read back from pixels / parsed from captions; JSON + PNG grids)
  fid        FID of generated images (t2i from --prompts, or i2i from --images) against a
             reference image folder (--ref-images) or statistics file (--ref-stats)
  clip       CLIP score of t2i samples with their prompts, or (--task i2i) CLIP image
             similarity of image variations with their source images
  fid-stats  FID statistics (.npz) of an image folder, to compute once and reuse (--ref-stats)
  gates      the stage-0 gates (AutoKL, CLIP, Optimus) on held-out shapes (vd_jax.eval.gates)

fid and clip write into a new `--out/<command>-NNN/` folder: samples/<index>.png (sample i
from input i mod P with seed + i, whatever the batch size), grid.png, metrics.json (the
metric, every setting, the model, the code version). `--resume DIR` continues an interrupted
run in DIR: samples already there are reused, the rest generated. `--config FILE` takes
defaults from a config (configs/eval_coco.py: the paper's COCO protocol); flags override it.
Usage errors exit with code 2 before any model loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SAMPLE_COMMANDS = ('fid', 'clip')
GRID_MAX = 64


def _model_args(p):
    from vd_jax.platform import CPU_BFLOAT16_MEASURED
    p.add_argument('--ckpt', help='vd_jax checkpoint folder (default: the shipped vd-mini model)')
    p.add_argument('--model', default=None,
                   help="a shipped model instead of --ckpt: 'vd-mini' (default) or 'tiny' (random "
                        'weights: a smoke test)')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--scale', type=float, default=7.5, help='guidance scale')
    from vd_jax.sampling_flags import add_sampler_flags
    add_sampler_flags(p)  # --sampler, --spacing, --karras, --guidance-rescale
    p.add_argument('--seed', type=int, default=0, help='sample i uses seed + i')
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--out', default='evals', help='output root; each run gets a new folder')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                   help=f'compute dtype (on a CPU backend bfloat16 is slower: {CPU_BFLOAT16_MEASURED})')


def _sample_args(p):
    p.add_argument('--config', help='a config file with defaults for these flags '
                                    '(e.g. configs/eval_coco.py); flags given override it')
    p.add_argument('--task', default='t2i', choices=['t2i', 'i2i'],
                   help='t2i: samples of --prompts; i2i: variations of --images')
    p.add_argument('--prompts', help='t2i: text file, one prompt per line, or a COCO captions '
                                     '.json (one caption per image)')
    p.add_argument('--images', help='i2i: text file, one image path per line')
    p.add_argument('--n', type=int, default=None,
                   help='number of samples (default: one per input; inputs repeat cyclically)')
    p.add_argument('--eta', type=float, default=0.0, help='DDIM eta')
    p.add_argument('--height', type=int, default=None, help="default: the model's image size")
    p.add_argument('--width', type=int, default=None)
    p.add_argument('--resume', metavar='DIR', help='continue the run in DIR (reuse its samples)')
    p.add_argument('--no-compile-cache', action='store_true',
                   help='do not use the persistent XLA compilation cache (~/.cache/vd_jax/xla)')


def _inception_arg(p, required=False):
    p.add_argument('--inception', required=required,
                   help='FID Inception weights: a converted folder (python -m vd_jax.convert '
                        'pt_inception-2015-12-05-6726825d.pth DIR), its inception.safetensors, '
                        'or the .pth itself')
    p.add_argument('--inception-batch-size', type=int, default=50)


def build_parser() -> argparse.ArgumentParser:
    from vd_jax.platform import exit_codes_epilog
    p = argparse.ArgumentParser(prog='python -m vd_jax.eval', description=__doc__,
                                epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('shapes', help='the shapes-world evaluation of every flow')
    _model_args(s)
    s.add_argument('--n', type=int, default=200, help='held-out samples per flow')
    s.add_argument('--flows', default=','.join(('t2i', 'i2t', 'i2i', 't2t', 'dual', 'guidance')),
                   help='comma-separated subset of t2i,i2t,i2i,t2t,dual,guidance and of the '
                        'parts alone: autokl,optimus,clip')
    s.add_argument('--decode', default='greedy', choices=['greedy', 'sample', 'beam'])

    f = sub.add_parser('fid', help='FID of generated samples against reference images/statistics')
    _model_args(f)
    _sample_args(f)
    _inception_arg(f)
    f.add_argument('--ref-images', help='reference image folder (its images, not sub-folders)')
    f.add_argument('--ref-stats', help='reference statistics .npz (fid-stats, or pytorch-fid '
                                       '--save-stats)')
    f.add_argument('--ref-size', type=int, default=None,
                   help='--ref-images are centre-cropped and resized to this square size '
                        '(default: the samples\' size; 0: as they are)')
    f.add_argument('--stats-out', help='also save the statistics of --ref-images to this .npz')

    c = sub.add_parser('clip', help='CLIP score (t2i) or CLIP image similarity (i2i)')
    _model_args(c)
    _sample_args(c)
    c.add_argument('--clip', help="vd_jax checkpoint folder with the CLIP towers to score with "
                                  "(ctx_text / ctx_image; default: the model's own)")
    c.add_argument('--clip-batch-size', type=int, default=32)

    st = sub.add_parser('fid-stats', help='FID statistics of an image folder, saved to .npz')
    st.add_argument('folder', help='image folder')
    st.add_argument('stats_out', metavar='OUT.npz', help='statistics file to write')
    _inception_arg(st, required=True)
    st.add_argument('--size', type=int, required=True,
                    help='centre-crop and resize every image to SIZE x SIZE first (use the size '
                         'of the samples you will compare with, e.g. 512); 0: as they are')
    st.add_argument('--n', type=int, default=None, help='only the first N images (by name)')
    p.commands = {'shapes': s, 'fid': f, 'clip': c, 'fid-stats': st}
    return p


# ------------------------------------------------------------------------------------------
# Checks before any model loads
# ------------------------------------------------------------------------------------------

def _apply_config(args, parser, argv):
    """--config FILE: its keys become the defaults of the command's flags; flags given win."""
    from vd_jax.sample_cli import UsageError
    from vd_jax.config import load_config
    try:
        cfg = load_config(args.config)
    except (ValueError, FileNotFoundError, SyntaxError) as e:
        raise UsageError(f'--config {args.config}: {e}') from None
    sub = parser.commands[args.command]
    known = {a.dest for a in sub._actions}
    every = set().union(*({a.dest for a in parser.commands[c]._actions} for c in SAMPLE_COMMANDS))
    bad = sorted(set(cfg.keys()) - every - {'help'})
    if bad:
        raise UsageError(f'--config {args.config}: unknown keys {bad} (keys are flag names with '
                         "'_', e.g. ref_images)")
    sub.set_defaults(**{k: v for k, v in cfg.items() if k in known})
    return parser.parse_args(argv)


def _model_id(args) -> str:
    from vd_jax.pipeline import DEFAULT_MODEL
    return os.path.abspath(args.ckpt) if args.ckpt else (args.model or DEFAULT_MODEL)


def _check_inception(path):
    from vd_jax.sample_cli import UsageError
    if not path:
        raise UsageError('--inception is required: the FID Inception weights (a converted folder, '
                         'inception.safetensors, or pt_inception-2015-12-05-6726825d.pth)')
    if not os.path.exists(path):
        raise UsageError(f"--inception '{path}' does not exist")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'inception.safetensors')):
            raise UsageError(f"--inception '{path}' has no inception.safetensors (convert the "
                             f'weights: python -m vd_jax.convert pt_inception-...pth {path})')
    elif not path.endswith(('.safetensors', '.pth', '.pt')):
        raise UsageError(f"--inception '{path}': expected a folder, .safetensors or .pth")


def _check_stats_out(path):
    from vd_jax.sample_cli import UsageError
    if not path.endswith('.npz'):
        raise UsageError(f"statistics output '{path}' must end in .npz")
    if os.path.exists(path):
        raise UsageError(f"statistics output '{path}' already exists (not overwritten)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"statistics output '{path}': folder '{folder}' is not writable")


def _check(args, parser, argv):
    """Validate everything that can be without a model; returns a dict of prepared inputs."""
    from vd_jax.sample_cli import UsageError, _check_out
    prep = {}
    if args.command == 'fid-stats':
        from vd_jax.eval.fid import FIDError
        from vd_jax.eval.reference import list_images
        _check_inception(args.inception)
        _check_stats_out(args.stats_out)
        for flag in ('inception_batch_size',) + (('n',) if args.n is not None else ()):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.size < 0:
            raise UsageError('--size must be >= 0')
        try:
            prep['paths'] = list_images(args.folder)[:args.n]
        except FIDError as e:
            raise UsageError(str(e)) from None
        return args, prep
    if args.command in SAMPLE_COMMANDS and args.config:
        args = _apply_config(args, parser, argv)
    for flag in ('steps', 'batch_size') + (('n',) if args.n is not None else ()):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.scale < 0 or args.seed < 0:
        raise UsageError('--scale and --seed must be >= 0')
    from vd_jax.sampling_flags import check_sampler_flags
    check_sampler_flags(args, UsageError)
    if args.ckpt and args.model:
        raise UsageError('give one of --ckpt and --model')
    if args.ckpt and not os.path.isfile(os.path.join(args.ckpt, 'config.json')):
        raise UsageError(f"--ckpt '{args.ckpt}' is not a vd_jax checkpoint folder (no config.json)")
    from vd_jax.pipeline import MODELS
    if args.model is not None and args.model not in MODELS:
        raise UsageError(f'--model {args.model!r}: shipped models are {sorted(MODELS)}')
    if args.command == 'shapes':
        from vd_jax.eval.shapes_eval import FLOWS, PARTS
        bad = [f for f in args.flows.split(',') if f not in FLOWS + PARTS]
        if bad:
            raise UsageError(f'--flows: unknown {bad}; choose from {list(FLOWS + PARTS)}')
        _check_out(args.out)
        return args, prep
    prep.update(_check_sampling(args))
    if args.resume is None:
        _check_out(args.out)
    return args, prep


def _check_sampling(args) -> dict:
    from vd_jax.eval import generate as G
    from vd_jax.eval.fid import FIDError
    from vd_jax.sample_cli import UsageError
    prep = {}
    if args.eta < 0:
        raise UsageError('--eta must be >= 0')
    for flag in ('height', 'width'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f'--{flag} must be >= 1')
    try:
        if args.task == 't2i':
            if not args.prompts:
                raise UsageError(f'{args.command} --task t2i needs --prompts FILE')
            inputs = G.read_prompts(args.prompts)
        else:
            if not args.images:
                raise UsageError(f'{args.command} --task i2i needs --images FILE (one image '
                                 'path per line)')
            inputs = G.read_image_list(args.images)
    except G.GenerationError as e:
        raise UsageError(str(e)) from None
    for flag, want in (('prompts', 't2i'), ('images', 'i2i')):
        if getattr(args, flag) and args.task != want:
            print(f'warning: --{flag} is ignored by --task {args.task}', file=sys.stderr)
    n = args.n or len(inputs)
    if args.seed + n + args.batch_size >= 2 ** 32:
        raise UsageError('--seed + --n must stay below 2^32 (sample i uses seed + i)')
    prep.update(inputs=inputs, n=n)
    if args.command == 'fid':
        from vd_jax.eval.reference import check_statistics, list_images
        _check_inception(args.inception)
        if args.inception_batch_size < 1:
            raise UsageError('--inception-batch-size must be >= 1')
        if bool(args.ref_images) == bool(args.ref_stats):
            raise UsageError('fid needs exactly one of --ref-images FOLDER and --ref-stats FILE.npz')
        if n < 2:
            raise UsageError('FID needs at least 2 samples (--n)')
        try:
            if args.ref_stats:
                if args.stats_out:
                    raise UsageError('--stats-out saves the statistics of --ref-images; with '
                                     '--ref-stats there is nothing to compute')
                prep['ref'] = check_statistics(args.ref_stats)
            else:
                prep['ref_paths'] = list_images(args.ref_images)
                if len(prep['ref_paths']) < 2:
                    raise UsageError(f"--ref-images '{args.ref_images}' has 1 image; FID needs "
                                     'at least 2')
        except FIDError as e:
            raise UsageError(str(e)) from None
        if args.stats_out:
            _check_stats_out(args.stats_out)
        if args.ref_size is not None and args.ref_size < 0:
            raise UsageError('--ref-size must be >= 0')
    else:
        if args.clip and not os.path.isfile(os.path.join(args.clip, 'config.json')):
            raise UsageError(f"--clip '{args.clip}' is not a vd_jax checkpoint folder "
                             '(no config.json)')
        if args.clip_batch_size < 1:
            raise UsageError('--clip-batch-size must be >= 1')
    spec = _spec(args, prep)
    prep['spec'] = spec
    if args.resume is not None:
        try:
            G.check_resume(args.resume, spec)
        except G.GenerationError as e:
            raise UsageError(str(e)) from None
    return prep


def _spec(args, prep):
    from vd_jax.eval.generate import GenerationSpec, inputs_digest
    return GenerationSpec(model=_model_id(args), task=args.task, sampler=args.sampler,
                          steps=int(args.steps), scale=float(args.scale), eta=float(args.eta),
                          spacing=args.spacing, karras=bool(args.karras),
                          guidance_rescale=float(args.guidance_rescale),
                          seed=int(args.seed), height=args.height, width=args.width,
                          dtype=args.dtype, num_inputs=len(prep['inputs']),
                          inputs_sha256=inputs_digest(prep['inputs']))


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------

def _load(args):
    from vd_jax.pipeline import VersatileDiffusion
    if args.ckpt:
        return VersatileDiffusion.from_checkpoint(args.ckpt, dtype=args.dtype)
    if args.model:
        return VersatileDiffusion.default(args.model, dtype=args.dtype)
    return VersatileDiffusion.default(dtype=args.dtype)


def _log(msg):
    print(msg, file=sys.stderr)


def _bar(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, unit='img', desc=desc, file=sys.stderr)


def _reference(args, prep, extractor, hw, folder):
    """(mu, sigma, record) of the reference: the --ref-stats file, or the --ref-images folder
    (cached in the run folder as reference_stats.npz, so a resumed run does not recompute)."""
    from vd_jax.eval.fid import load_statistics, save_statistics
    from vd_jax.eval.reference import folder_statistics
    if args.ref_stats:
        mu, sigma = prep['ref']
        return mu, sigma, {'kind': 'statistics', 'path': os.path.abspath(args.ref_stats)}
    size = None if args.ref_size == 0 else ((args.ref_size, args.ref_size) if args.ref_size
                                            else tuple(hw))
    rec = {'kind': 'images', 'path': os.path.abspath(args.ref_images),
           'num_images': len(prep['ref_paths']),
           'preprocess': (f'centre crop + bicubic resize to {size[0]}x{size[1]}' if size
                          else 'none (original sizes)'),
           'inception': os.path.abspath(args.inception)}
    cache, cache_rec = (os.path.join(folder, 'reference_stats.npz'),
                        os.path.join(folder, 'reference.json'))
    if os.path.isfile(cache) and os.path.isfile(cache_rec):
        with open(cache_rec) as f:
            if json.load(f) == rec:
                _log(f'reference statistics: reusing {cache}')
                mu, sigma = load_statistics(cache)
                return mu, sigma, dict(rec, cached=cache)
    t0 = time.time()
    with _bar(len(prep['ref_paths']), 'reference features') as bar:
        stats = folder_statistics(prep['ref_paths'], extractor, size, bar.update)
    stats.save(cache)
    with open(cache_rec, 'w') as f:
        json.dump(rec, f, indent=1)
    if args.stats_out:
        save_statistics(args.stats_out, *stats.mu_sigma(), num_images=stats.n)
        _log(f'wrote the reference statistics to {args.stats_out}')
        rec['saved_to'] = os.path.abspath(args.stats_out)
    rec['seconds'] = round(time.time() - t0, 1)
    return stats.mu, stats.sigma, rec


def _grid(folder, paths, task, inputs, hw):
    """grid.png of the first samples (i2i: each source image before its variation)."""
    from vd_jax.image_io import load_image
    from vd_jax.outputs import make_grid, save_png
    k = min(len(paths), GRID_MAX if task == 't2i' else GRID_MAX // 2)
    ims = [load_image(p).astype('float32') / 255 for p in paths[:k]]
    cols = None
    if task == 'i2i':
        from vd_jax.eval.reference import fit
        pairs = []
        for i, im in enumerate(ims):
            pairs += [fit(load_image(inputs[i % len(inputs)]), tuple(hw)).astype('float32') / 255, im]
        ims, cols = pairs, 8
    import numpy as np
    out = os.path.join(folder, 'grid.png')
    if os.path.exists(out):
        os.remove(out)
    save_png(out, make_grid(np.stack(ims), cols=cols))
    return out


def _run_sampling(args, prep) -> int:
    import jax
    import numpy as np
    from vd_jax.checkpoint import CheckpointError
    from vd_jax.eval import generate as G
    from vd_jax.eval.fid import FIDError, InceptionFeatureExtractor
    from vd_jax.image_io import ImageReadError
    from vd_jax.outputs import code_version, new_run_dir
    from vd_jax.pipeline import TaskError
    from vd_jax.sample_cli import _compile_cache
    t0 = time.time()
    cache = _compile_cache(args)
    spec: G.GenerationSpec = prep['spec']
    extractor = None
    try:
        if args.command == 'fid':  # the small network first: a bad weights file fails fast
            extractor = InceptionFeatureExtractor.from_pretrained(
                args.inception, batch_size=args.inception_batch_size)
        vd = _load(args)
        vd.check_task(G.TASKS[args.task])
    except (FIDError, CheckpointError, TaskError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    untrained = vd.source.startswith('random:')
    if untrained:
        _log(f'note: {vd.source}: RANDOM weights, the metrics mean nothing (a smoke test)')
    hw = (args.height or vd.image_size, args.width or vd.image_size)
    folder = args.resume or new_run_dir(args.out, args.command)
    record = {'command': args.command, 'task': args.task, 'run_dir': os.path.abspath(folder)}
    timing = {}
    try:
        if args.command == 'fid':
            mu_r, sigma_r, record['reference'] = _reference(args, prep, extractor, hw, folder)
        n, inputs = prep['n'], prep['inputs']
        with _bar(len(G.missing_samples(folder, n)), f'{args.command}: {args.task} samples') as bar:
            gen = G.generate(vd, spec, inputs, n, folder, args.batch_size, log=_log,
                             progress=bar.update)
        timing['generation_s'] = gen['seconds']
        paths = G.sample_paths(folder, n)
        t_metric = time.time()
        if args.command == 'fid':
            from vd_jax.eval.fid import frechet_distance
            from vd_jax.eval.reference import folder_statistics
            with _bar(n, 'sample features') as bar:
                stats = folder_statistics(paths, extractor, None, bar.update)
            stats.save(os.path.join(folder, 'samples_stats.npz'))
            record['fid'] = frechet_distance(stats.mu, stats.sigma, mu_r, sigma_r)
            record['inception'] = os.path.abspath(args.inception)
            summary = f"fid = {record['fid']:.4f}"
        else:
            from vd_jax.eval.clip_score import CLIPScorer
            from vd_jax.eval.reference import clip_scores, image_similarities
            kw = dict(batch_size=args.clip_batch_size)
            if args.clip:
                scorer = CLIPScorer.from_checkpoint(args.clip, text=args.task == 't2i', **kw)
            else:
                p, ctx = vd.params, vd.config['ctx']
                scorer = CLIPScorer(p['ctx_text'] if args.task == 't2i' else None,
                                    p['ctx_image'], ctx['text'] if args.task == 't2i' else None,
                                    ctx['image'], **kw)
            expanded = [inputs[i % len(inputs)] for i in range(n)]
            with _bar(n, 'CLIP') as bar:  # 100 * cos; the score clamps each pair at 0
                cos = (clip_scores(scorer, expanded, paths, progress=bar.update, clamp=False)
                       if args.task == 't2i' else
                       image_similarities(scorer, expanded, paths, progress=bar.update,
                                          clamp=False))
            scores = np.maximum(cos, 0.0)
            name = 'clip_score' if args.task == 't2i' else 'clip_image_similarity'
            record[name] = float(np.mean(scores))
            record[f'{name}_std'] = float(np.std(scores))
            record[f'{name}_unclamped'] = float(np.mean(cos))  # tells untrained models apart
            record['clip_towers'] = os.path.abspath(args.clip) if args.clip else 'the model\'s own'
            with open(os.path.join(folder, 'scores.jsonl'), 'w') as f:
                for i, (s, c) in enumerate(zip(scores, cos)):
                    f.write(json.dumps({'index': i, 'input': expanded[i], name: float(s),
                                        f'{name}_unclamped': float(c)}) + '\n')
            summary = f'{name} = {record[name]:.4f} (std {record[name + "_std"]:.4f})'
        timing['metric_s'] = round(time.time() - t_metric, 2)
        grid = _grid(folder, paths, args.task, inputs, hw)
    except (FIDError, TaskError, ImageReadError, G.GenerationError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items()}
    record.update(n=n, generated=gen['generated'], reused=gen['reused'],
                  samples=os.path.join(os.path.abspath(folder), G.SAMPLES), grid=grid,
                  generation=dict(spec.to_dict(), height=hw[0], width=hw[1]),
                  model={'source': vd.source, 'untrained': untrained,
                         'config': vd.config.get('name', None)},
                  settings=settings, num_inputs=len(inputs), code_version=code_version(),
                  jax_version=jax.__version__, backend=jax.default_backend(),
                  devices=[str(d) for d in jax.devices()], compile_cache=cache,
                  seconds=dict(timing, total=round(time.time() - t0, 1)),
                  written_at=time.strftime('%Y-%m-%dT%H:%M:%S%z'))
    out = os.path.join(folder, 'metrics.json')
    with open(out + '.tmp', 'w') as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(out + '.tmp', out)
    print(f'{summary} ({n} samples: {gen["generated"]} generated, {gen["reused"]} reused); '
          f'wrote {out}')
    return 0


def _run_fid_stats(args, prep) -> int:
    from vd_jax.eval.fid import FIDError, InceptionFeatureExtractor, save_statistics
    from vd_jax.eval.reference import folder_statistics
    from vd_jax.image_io import ImageReadError
    from vd_jax.outputs import code_version
    t0 = time.time()
    try:
        extractor = InceptionFeatureExtractor.from_pretrained(
            args.inception, batch_size=args.inception_batch_size)
        size = (args.size, args.size) if args.size else None
        with _bar(len(prep['paths']), 'features') as bar:
            stats = folder_statistics(prep['paths'], extractor, size, bar.update)
        save_statistics(args.stats_out, *stats.mu_sigma(), num_images=stats.n)
    except (FIDError, ImageReadError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    rec = {'folder': os.path.abspath(args.folder), 'num_images': stats.n,
           'preprocess': f'centre crop + bicubic resize to {args.size}x{args.size}' if size
           else 'none (original sizes)', 'inception': os.path.abspath(args.inception),
           'code_version': code_version(), 'seconds': round(time.time() - t0, 1)}
    with open(args.stats_out + '.json', 'w') as f:
        json.dump(rec, f, indent=1)
    print(f'wrote {args.stats_out} ({stats.n} images) and {args.stats_out}.json')
    return 0


def main(argv=None) -> int:
    from vd_jax.platform import EXIT_OK, EXIT_USAGE, quiet_libraries
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['gates']:  # its own small parser (vd_jax/eval/gates.py)
        from vd_jax.eval import gates
        return gates.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from vd_jax.sample_cli import UsageError
    try:
        args, prep = _check(args, parser, argv)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    from vd_jax.platform import configure_xla
    configure_xla()
    if args.command == 'fid-stats':
        return _run_fid_stats(args, prep)
    if args.command in SAMPLE_COMMANDS:
        return _run_sampling(args, prep)
    from vd_jax.outputs import code_version, new_run_dir
    from vd_jax.checkpoint import CheckpointError
    t0 = time.time()
    try:
        vd = _load(args)
    except CheckpointError as e:  # e.g. the shipped model is not installed
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    from vd_jax.eval.shapes_reader import IMAGE_SIZE
    if vd.image_size != IMAGE_SIZE:
        print(f'error: shapes evaluates models of the shapes world ({IMAGE_SIZE} px images); '
              f'{vd.source} makes {vd.image_size} px images', file=sys.stderr)
        return EXIT_USAGE
    out = new_run_dir(args.out, args.command)
    from vd_jax.eval.shapes_eval import EvalSettings, evaluate
    settings = EvalSettings(n=args.n, steps=args.steps, scale=args.scale, sampler=args.sampler,
                            spacing=args.spacing, karras=args.karras,
                            guidance_rescale=args.guidance_rescale,
                            seed=args.seed, batch_size=args.batch_size, decode=args.decode,
                            flows=tuple(args.flows.split(',')))
    record = evaluate(vd, settings, out, log=_log)
    record.update(command=args.command, code_version=code_version(),
                  seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(record, f, indent=1)
    print(f'wrote {out}/metrics.json')
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
