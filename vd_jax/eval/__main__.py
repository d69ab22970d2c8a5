"""Evaluation command line: `python -m vd_jax.eval <command> ...`.

  shapes     every flow of a model trained on the shapes world, on held-out prompts and images
             (attribute accuracy read back from pixels / parsed from captions; JSON + PNG grids);
             --prompt-control N adds prompt control at a fixed seed (vd_jax.eval.prompt_control)
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

import numpy as np

from vd_jax.cli.model_flags import add_model_flags, load_model
from vd_jax.cli.usage import compile_cache, report
from vd_jax.errors import CheckpointError, InputError
from vd_jax.eval import generate as G
from vd_jax.eval.checks import EVAL_MODEL_FLAGS, check
from vd_jax.eval.reference import fit
from vd_jax.image_io import load_image
from vd_jax.outputs import code_version, make_grid, new_run_dir, save_png
from vd_jax.platform import configure_xla, exit_codes_epilog, quiet_libraries
from vd_jax.sampling_flags import add_sampler_flags, model_grid_notice

GRID_MAX = 64


def _model_args(p):
    add_model_flags(p, EVAL_MODEL_FLAGS)  # --ckpt, --model, --dtype
    p.add_argument('--steps', type=int, default=50)
    add_sampler_flags(p)  # --scale, --sampler, --spacing, --karras, --guidance-rescale
    p.add_argument('--seed', type=int, default=0, help='sample i uses seed + i')
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--out', default='evals', help='output root; each run gets a new folder')


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
    s.add_argument('--prompt-control', type=int, default=0, metavar='N',
                   help='also measure prompt control on N held-out bases (vd_jax.eval.'
                        'prompt_control: at a fixed seed, does changing only the background / '
                        'position word change that attribute?), with the same sampling flags; '
                        '0 = off (default)')

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
    # listed for --help; `main` hands `gates ...` to vd_jax.eval.gates.main before parsing
    sub.add_parser('gates', help='the stage-0 gates on held-out shapes (python -m vd_jax.eval '
                   'gates --help)', add_help=False)
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
# Running
# ------------------------------------------------------------------------------------------

def _load(args):
    return load_model(args.ckpt, model=args.model, dtype=args.dtype)


def _log(msg):
    print(msg, file=sys.stderr)


def _bar(total, desc):
    # lazy: tqdm (+19 ms)
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, unit='img', desc=desc, file=sys.stderr)


def _grid(folder, paths, task, inputs, hw):
    """grid.png of the first samples (i2i: each source image before its variation)."""
    k = min(len(paths), GRID_MAX if task == 't2i' else GRID_MAX // 2)
    ims = [load_image(p).astype('float32') / 255 for p in paths[:k]]
    cols = None
    if task == 'i2i':
        pairs = []
        for i, im in enumerate(ims):
            pairs += [fit(load_image(inputs[i % len(inputs)]), tuple(hw)).astype('float32') / 255, im]
        ims, cols = pairs, 8
    out = os.path.join(folder, 'grid.png')
    if os.path.exists(out):
        os.remove(out)
    save_png(out, make_grid(np.stack(ims), cols=cols))
    return out


def _metric(args, prep):
    """The metric of a sampling command (`FIDMetric` or `CLIPMetric`: load, prepare, score)."""
    if args.command == 'fid':
        # lazy: vd_jax.eval.fid pulls in jax, flax (+1.6 s)
        from vd_jax.eval.fid import FIDMetric  # noqa: PLC0415
        return FIDMetric(args.inception, args.inception_batch_size, _bar,
                         ref_stats=prep.get('ref'), ref_stats_path=args.ref_stats,
                         ref_paths=prep.get('ref_paths'), ref_images=args.ref_images,
                         ref_size=args.ref_size, stats_out=args.stats_out, log=_log)
    # lazy: vd_jax.eval.clip_score pulls in jax, flax (+1.6 s)
    from vd_jax.eval.clip_score import CLIPMetric  # noqa: PLC0415
    return CLIPMetric(args.task, _bar, towers=args.clip, batch_size=args.clip_batch_size)


def _run_sampling(args, prep) -> int:
    # lazy: jax (+1.3 s)
    import jax  # noqa: PLC0415
    t0 = time.time()
    cache = compile_cache(not args.no_compile_cache)
    spec: G.GenerationSpec = prep['spec']
    metric = _metric(args, prep)
    try:
        metric.load()  # the small network first: a bad weights file fails fast
        vd = _load(args)
        vd.check_task(G.TASKS[args.task])
    except (InputError, CheckpointError, ValueError) as e:
        return report(e)
    untrained = vd.source.startswith('random:')
    if untrained:
        _log(f'note: {vd.source}: RANDOM weights, the metrics mean nothing (a smoke test)')
    hw = (args.height or vd.image_size, args.width or vd.image_size)
    folder = args.resume or new_run_dir(args.out, args.command)
    record = {'command': args.command, 'task': args.task, 'run_dir': os.path.abspath(folder)}
    timing = {}
    try:
        record.update(metric.prepare(hw, folder))
        n, inputs = prep['n'], prep['inputs']
        with _bar(len(G.missing_samples(folder, n)), f'{args.command}: {args.task} samples') as bar:
            gen = G.generate(vd, spec, inputs, n, folder, args.batch_size, log=_log,
                             progress=bar.update)
        timing['generation_s'] = gen['seconds']
        paths = G.sample_paths(folder, n)
        t_metric = time.time()
        scores, summary = metric.score(vd, paths, inputs, folder)
        record.update(scores)
        timing['metric_s'] = round(time.time() - t_metric, 2)
        grid = _grid(folder, paths, args.task, inputs, hw)
    except InputError as e:
        return report(e)
    settings = {k: v for k, v in vars(args).items()}
    record.update(n=n, generated=gen['generated'], reused=gen['reused'],
                  samples=os.path.join(os.path.abspath(folder), G.SAMPLES), grid=grid,
                  generation=dict(spec.to_dict(), height=hw[0], width=hw[1],
                                  spacing_used=model_grid_notice(args, vd.schedule, False)[0]),
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
    from vd_jax.eval.fid import InceptionFeatureExtractor, folder_statistics, save_statistics  # noqa: PLC0415
    t0 = time.time()
    try:
        extractor = InceptionFeatureExtractor.from_pretrained(
            args.inception, batch_size=args.inception_batch_size)
        size = (args.size, args.size) if args.size else None
        with _bar(len(prep['paths']), 'features') as bar:
            stats = folder_statistics(prep['paths'], extractor, size, bar.update)
        save_statistics(args.stats_out, *stats.mu_sigma(), num_images=stats.n)
    except (InputError, ValueError) as e:
        return report(e)
    rec = {'folder': os.path.abspath(args.folder), 'num_images': stats.n,
           'preprocess': f'centre crop + bicubic resize to {args.size}x{args.size}' if size
           else 'none (original sizes)', 'inception': os.path.abspath(args.inception),
           'code_version': code_version(), 'seconds': round(time.time() - t0, 1)}
    with open(args.stats_out + '.json', 'w') as f:
        json.dump(rec, f, indent=1)
    print(f'wrote {args.stats_out} ({stats.n} images) and {args.stats_out}.json')
    return 0


def _run_shapes(args, prep) -> int:
    # lazy: vd_jax.eval.shapes_eval pulls in tensorflow_datasets, grain, orbax, ... (+2.3 s)
    from vd_jax.eval.shapes_eval import EvalSettings, evaluate  # noqa: PLC0415
    # lazy: vd_jax.eval.shapes_reader pulls in tensorflow_datasets, grain, orbax, ... (+2.1 s)
    from vd_jax.eval.shapes_reader import IMAGE_SIZE  # noqa: PLC0415
    t0 = time.time()
    try:
        vd = _load(args)
    except CheckpointError as e:  # e.g. the shipped model is not installed
        return report(e)
    if vd.image_size != IMAGE_SIZE:
        return report(f'shapes evaluates models of the shapes world ({IMAGE_SIZE} px images); '
                      f'{vd.source} makes {vd.image_size} px images')
    if args.prompt_control:
        try:
            vd.check_task('text_to_image')
        except InputError as e:
            return report(f'--prompt-control needs text -> image: {e}')
    out = new_run_dir(args.out, args.command)
    settings = EvalSettings(n=args.n, steps=args.steps, scale=args.scale, sampler=args.sampler,
                            spacing=args.spacing, karras=args.karras,
                            guidance_rescale=args.guidance_rescale,
                            seed=args.seed, batch_size=args.batch_size, decode=args.decode,
                            flows=tuple(args.flows.split(',')))
    record = evaluate(vd, settings, out, log=_log)
    # the grid 'auto' became for this model (trailing for a zero-terminal-SNR v model)
    record['settings']['spacing_used'] = model_grid_notice(args, vd.schedule, False)[0]
    if args.prompt_control:
        record['prompt_control'] = _prompt_control(vd, args, out)
        print('prompt_control: ' + json.dumps(record['prompt_control']))
    record.update(command=args.command, code_version=code_version(),
                  seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(record, f, indent=1)
    print(f'wrote {out}/metrics.json')
    return 0


PROMPT_CONTROL_ROWS = 8   # bases shown in prompt_control_<attribute>.png


def _prompt_control(vd, args, out: str) -> dict:
    """`vd_jax.eval.prompt_control` with the command's sampling flags, and its settings; writes
    `out/prompt_control_<attribute>.png`: a row per base (the first 8), a column per value of
    the attribute, every image of a row from the same seed."""
    # lazy: vd_jax.eval.prompt_control pulls in tensorflow_datasets, grain, ... (+2.1 s)
    from vd_jax.eval.prompt_control import ATTRIBUTES, prompt_control  # noqa: PLC0415
    t0 = time.time()
    sampling = dict(steps=args.steps, scale=args.scale, sampler=args.sampler,
                    spacing=args.spacing, karras=args.karras,
                    guidance_rescale=args.guidance_rescale)
    rec = prompt_control(vd, args.prompt_control, attributes=ATTRIBUTES, seed=args.seed,
                         batch_size=args.batch_size, keep=PROMPT_CONTROL_ROWS, **sampling)
    rec['settings'] = dict(sampling, n=args.prompt_control, attributes=list(ATTRIBUTES),
                           seed=args.seed, template=0, batch_size=args.batch_size)
    rec['grids'] = {}
    for attr, images in rec.pop('images').items():
        path = os.path.join(out, f'prompt_control_{attr}.png')
        save_png(path, make_grid(images.reshape((-1,) + images.shape[2:]),
                                 cols=images.shape[1]),
                 dict(rec['settings'], model=vd.source, rows='held-out bases (seed + row)',
                      columns=f'{attr}: ' + ', '.join(rec['values'][attr])))
        rec['grids'][attr] = path
    rec['seconds'] = round(time.time() - t0, 1)
    return rec


RUNS = {'shapes': _run_shapes, 'fid': _run_sampling, 'clip': _run_sampling,
        'fid-stats': _run_fid_stats}


def main(argv=None) -> int:
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['gates']:  # its own small parser (vd_jax/eval/gates.py)
        # lazy: vd_jax.eval.gates pulls in tensorflow_datasets, grain, orbax, ... (+2.1 s)
        from vd_jax.eval import gates  # noqa: PLC0415
        return gates.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args, prep = check(args, parser, argv)
    except (InputError, CheckpointError) as e:  # CheckpointError: a model's broken config
        return report(e)
    configure_xla()
    return RUNS[args.command](args, prep)


if __name__ == '__main__':
    sys.exit(main())
