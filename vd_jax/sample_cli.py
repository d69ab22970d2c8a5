"""The sampling command line (`python sample.py ...`): flags -> pipeline -> files on disk.

Every run writes into a new `OUT/run-NNN/` folder (earlier runs are never overwritten):
one PNG per image, `grid.png`, `texts.json`/`texts.txt` for text outputs, and
`settings.json` with every setting, the checkpoint and the code version. Every flag, input
file and the output folder are checked before any model is loaded; usage errors exit with
code 2 and one `error: ...` line, and nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

DEMO_PROMPT = 'a large red circle at the center on a white background'  # the shapes world
UNTRAINED = ('UNTRAINED MODEL: random weights (--model tiny / --config), the outputs are noise; '
             'this run only proves that the install works.')
# flags every task uses; the others belong to the tasks that list them in `CliTask.flags`
COMMON = {'ckpt', 'model', 'config', 'task', 'n', 'steps', 'scale', 'sampler', 'eta', 'seed', 'dtype',
          'batch_size', 'out', 'uncond', 'spacing', 'no_compile_cache'}


@dataclasses.dataclass(frozen=True)
class CliTask:
    """How one `--task` maps onto the pipeline.

    method: the `VersatileDiffusion` method; needs: required inputs ('prompt', 'image');
    flags: the task-specific flags it reads (others given are warned about); batched: one
    call per input x n in batches of --batch-size (else one call with n); kwargs: flags ->
    the method's keyword arguments.
    """
    method: str
    needs: Tuple[str, ...]
    flags: Tuple[str, ...]
    batched: bool
    kwargs: Callable[[argparse.Namespace], dict]


def _focus(a):
    return 0.5 if a.focus is None else a.focus


IMG = ('height', 'width')
TASKS: Dict[str, CliTask] = {
    't2i': CliTask('text_to_image', ('prompt',), ('prompt', 'prompts', 'negative') + IMG, True,
                   lambda a: dict(negative_prompt=a.negative, height=a.height, width=a.width)),
    'i2i': CliTask('image_variation', ('image',),
                   ('image', 'images', 'fidelity', 'focus', 'color_adjust') + IMG, True,
                   lambda a: dict(fidelity=a.fidelity, focus=_focus(a),
                                  color_adjust=a.color_adjust, height=a.height, width=a.width)),
    'i2t': CliTask('image_to_text', ('image',), ('image', 'images', 'decode', 'temperature'),
                   True, lambda a: dict(decode=a.decode, temperature=a.temperature)),
    't2t': CliTask('text_variation', ('prompt',),
                   ('prompt', 'prompts', 'negative', 'decode', 'temperature'), True,
                   lambda a: dict(decode=a.decode, temperature=a.temperature,
                                  negative_prompt=a.negative)),
    'dual': CliTask('dual_guided', ('prompt', 'image'),
                    ('prompt', 'image', 'mix', 'mix_level', 'focus', 'negative') + IMG, False,
                    lambda a: dict(mix=a.mix, mix_level=a.mix_level, focus=_focus(a),
                                   negative_prompt=a.negative, height=a.height, width=a.width)),
    'multi': CliTask('multi_context', ('image',),
                     ('image', 'images', 'prompt', 'strength', 'mask', 'mix', 'focus',
                      'negative') + IMG, False,
                     lambda a: dict(strengths=a.strength or None, text_strength=a.mix,
                                    focus=_focus(a), negative_prompt=a.negative,
                                    height=a.height, width=a.width)),
    'disentangle': CliTask('disentangle', ('image',), ('image', 'focus', 'dislevel') + IMG,
                           False, lambda a: dict(
                               focus=None if a.dislevel is not None else
                               (1.0 if a.focus is None else a.focus),
                               level=a.dislevel, height=a.height, width=a.width)),
    'i2t2i': CliTask('i2t2i', ('image',), ('image', 'positive', 'negative') + IMG, False,
                     lambda a: dict(positive=a.positive, negative=a.negative, height=a.height,
                                    width=a.width)),
}


class UsageError(ValueError):
    """A flag, input file or output folder that cannot be used (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    from vd_jax.platform import exit_codes_epilog
    p = argparse.ArgumentParser(prog='sample.py', description=__doc__, epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--ckpt', help='vd_jax checkpoint folder (python -m vd_jax.convert ..., or a training '
                     'export)')
    a('--model', default=None, help="a model shipped in the package, without --ckpt: 'vd-mini' "
                                    "(the default, trained on the shapes world) or 'tiny' (random "
                                    'weights, a smoke test)')
    a('--config', default=None, help='random weights of this config (a smoke test), e.g. vd_dc:tiny')
    a('--task', default=None, choices=sorted(TASKS), help='what to run (default t2i)')
    a('--prompt', action='append', default=[], help='a prompt (repeatable)')
    a('--prompts', help='a text file with one prompt per line')
    a('--image', action='append', default=[], help='an input image file (repeatable)')
    a('--images', help='a text file with one image path per line')
    a('--n', type=int, default=4, help='samples per input (default 4)')
    a('--steps', type=int, default=50)
    a('--scale', type=float, default=7.5, help='classifier-free guidance scale (>= 0; 1 = off)')
    a('--sampler', default='ddim', choices=['ddim', 'ddpm', 'dpm++'])
    a('--spacing', default='auto', choices=['auto', 'uniform', 'leading', 'linspace', 'full'],
      help="timestep grid (default auto: the original DDIM grid where it is defined, else "
           "'leading' with a note; dpm++: linspace)")
    a('--eta', type=float, default=0.0, help='DDIM eta (>= 0)')
    a('--seed', type=int, default=0, help='sample i uses seed + i (0 <= seed < 2^32)')
    a('--dtype', default='float32', help='compute dtype: float32 (default) or bfloat16')
    a('--height', type=int)
    a('--width', type=int)
    a('--batch-size', type=int, default=8, help='samples per compiled call')
    a('--out', default='samples', help='output root; each run gets a new run-NNN folder')
    a('--uncond', default='v1.0', choices=['v1.0', 'legacy', 'diffusers'],
      help='unconditional-context convention')
    a('--negative', default='', help='negative prompt (t2i, t2t, dual, multi); i2t2i: what to remove')
    a('--positive', default='', help='i2t2i: what to add')
    a('--mix', type=float, default=0.5, help='dual/multi: text strength in [0, 1]')
    a('--mix-level', '--level', dest='mix_level', default='attention',
      choices=['attention', 'layer', 'model'], help='dual: where the contexts mix (--level: '
      'the former name)')
    a('--focus', type=float, default=None,
      help='i2i/dual/multi/disentangle: style-semantic focus in [0, 1] (0.5 = off)')
    a('--dislevel', type=int, default=None, choices=[-2, -1, 0, 1, 2],
      help='disentangle: the paper/CLI levels -2..2')
    a('--fidelity', type=float, default=0.0, help='i2i: start from the input (0..1)')
    a('--color-adjust', action='store_true', help='i2i: match input colours')
    a('--strength', type=float, action='append', default=[],
      help='multi: strength of each --image (repeatable, in order)')
    a('--mask', action='append', default=[],
      help="multi: a keep-mask image per --image, in order (white = use), or 'none'")
    a('--decode', default='sample', choices=['sample', 'greedy', 'beam'],
      help='text outputs: Optimus decoding (the original samples)')
    a('--temperature', type=float, default=1.0)
    a('--no-compile-cache', action='store_true',
      help='do not use the persistent XLA compilation cache (~/.cache/vd_jax/xla)')
    return p


# ------------------------------------------------------------------------------------------------
# Checks before any model is loaded
# ------------------------------------------------------------------------------------------------

def _read_list(path: str, flag: str) -> List[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} '{path}' " + ('is a folder, not a text file' if os.path.isdir(path)
                                                 else 'does not exist'))
    try:
        with open(path, encoding='utf-8') as f:
            items = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"{flag} '{path}' is not a UTF-8 text file (one entry per line)") from None
    except OSError as e:
        raise UsageError(f"{flag} '{path}' cannot be read: {e.strerror}") from None
    if not items:
        raise UsageError(f"{flag} '{path}' is empty (give one entry per line)")
    return items


def _check_out(root: str, flag: str = '--out') -> None:
    """The output root must be (or become) a writable folder; checked before sampling so
    results are never lost at the end."""
    from vd_jax.outputs import OutputLocationError, check_output_folder
    try:
        check_output_folder(root, flag)
    except OutputLocationError as e:
        raise UsageError(str(e)) from None


def _check_values(args) -> None:
    """Numeric flags, with the Python API's own checks (and messages) where it has them
    (--steps: `check_steps` in `validate`, naming the sampler)."""
    from vd_jax.tasks.common import SamplingOptions, TaskError, check_n
    api = [('n', lambda: check_n(args.n))] + [
        (f, lambda f=f: SamplingOptions(**{f: getattr(args, f)}))
        for f in ('scale', 'eta', 'seed', 'dtype')]
    for flag, check in api:
        try:
            check()
        except TaskError as e:
            raise UsageError(f'--{flag}: {e}') from None
    for flag, ok, want in (('batch-size', args.batch_size >= 1, 'an integer >= 1'),
                           ('mix', 0 <= args.mix <= 1, 'in [0, 1]'),
                           ('temperature', args.temperature > 0, '> 0'),
                           ('fidelity', 0 <= args.fidelity <= 1, 'in [0, 1]'),
                           ('focus', args.focus is None or 0 <= args.focus <= 1, 'in [0, 1]')):
        if not ok:
            raise UsageError(f'--{flag}: must be {want}, got {getattr(args, flag.replace("-", "_"))}')


def validate(args, parser) -> Tuple[CliTask, List[str], List[str]]:
    """Everything checkable without a model: (task, prompts, image paths). Raises UsageError."""
    explicit_task, args.task = args.task is not None, args.task or 't2i'
    t = TASKS[args.task]
    defaults = parser.parse_args([])
    for name in sorted(set(vars(args)) - COMMON - set(t.flags)):
        if getattr(args, name) != getattr(defaults, name):
            print(f"warning: --{name.replace('_', '-')} is ignored by --task {args.task}",
                  file=sys.stderr)
    _check_values(args)
    from vd_jax.diffusion.sampling import check_steps
    try:
        args.spacing, notice = check_steps(args.sampler, args.steps, args.spacing or 'auto')
    except ValueError as e:
        raise UsageError(f'--sampler {args.sampler} --steps {args.steps}: {e}') from None
    if notice:
        print(f'note: {notice}', file=sys.stderr)
    prompts = list(args.prompt) + (_read_list(args.prompts, '--prompts') if args.prompts else [])
    listed = _read_list(args.images, '--images') if args.images else []
    paths = list(args.image) + listed
    if 'prompt' in t.needs and not prompts:
        # the demo prompt is for a plain `python sample.py` (what the README's first command
        # runs); anything more specific without a prompt is a mistake to report
        if args.ckpt or args.config or explicit_task or paths:
            raise UsageError(f'--task {args.task} needs a prompt (--prompt TEXT or --prompts FILE)')
        print(f'no --prompt given: using the demo prompt {DEMO_PROMPT!r}', file=sys.stderr)
        prompts = [DEMO_PROMPT]
    if 'image' in t.needs and not paths:
        raise UsageError(f'--task {args.task} needs an input image (--image FILE or --images FILE)')
    from vd_jax.image_io import ImageReadError, load_image
    masks = [m for m in args.mask if m.lower() != 'none']
    if args.mask and len(args.mask) != len(paths):
        raise UsageError(f'{len(args.mask)} --mask for {len(paths)} --image (give one per image, '
                         "or 'none')")
    flags = ['--image'] * len(args.image) + [f"--images '{args.images}'"] * len(listed) + \
        ['--mask'] * len(masks)
    for flag, p in zip(flags, paths + masks):
        try:
            load_image(p)
        except (ImageReadError, FileNotFoundError) as e:
            raise UsageError(f'{flag}: {e}') from None
    if sum(x is not None for x in (args.ckpt, args.model, args.config)) > 1:
        raise UsageError('give one of --ckpt, --model and --config')
    from vd_jax.pipeline import MODELS
    if args.model is not None and args.model not in MODELS:
        raise UsageError(f'--model {args.model!r}: shipped models are {sorted(MODELS)}')
    if args.ckpt is not None and not os.path.isfile(os.path.join(args.ckpt, 'config.json')):
        raise UsageError(f"--ckpt '{args.ckpt}' is not a vd_jax checkpoint folder (no config.json)")
    _check_out(args.out)
    return t, prompts, paths


def warn_truncated_prompts(vd, args, prompts) -> None:
    """One warning per over-long prompt the user gave, by its index among the prompts given
    (the pipeline batches and repeats them; its own warnings would name batch positions)."""
    from vd_jax.tokenizers import truncation_message
    tok = vd.components.tokenizer('clip')
    named = [(f'prompt {i}', p) for i, p in enumerate(prompts)]
    named += [(f'--{k}', getattr(args, k)) for k in ('negative', 'positive') if getattr(args, k)]
    for k, tokens in tok.truncated([p for _, p in named]):
        print(f'warning: {truncation_message(named[k][0], tokens, tok.max_length, named[k][1])}',
              file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def _compile_cache(args) -> Optional[str]:
    if args.no_compile_cache:
        return None
    import jax
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    path = os.path.join(root, 'vd_jax', 'xla')
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    return path


def run_task(vd, t: CliTask, args, prompts, images, paths, bar
             ) -> Tuple[List[str], Optional[np.ndarray], Optional[List[str]]]:
    """Call the pipeline; returns (a label per output, images or None, texts or None)."""
    from vd_jax.image_io import load_image
    call = getattr(vd, t.method)
    kw = dict(t.kwargs(args), steps=args.steps, scale=args.scale, sampler=args.sampler,
              eta=args.eta, spacing=args.spacing)

    def progress(done, total):  # done restarts at each denoising run (i2t2i runs two)
        # within a run `done` only grows: a report that does not is the next run's first
        bar.update(done - progress.last if done > progress.last else done)
        progress.last = done
    progress.last = 0
    from vd_jax.diffusion.sampling import make_plan
    steps = make_plan(args.sampler, args.steps, spacing=args.spacing).num_steps
    if t.batched:  # inputs x n in batches of --batch-size; seeds continue across batches
        inputs, names = (prompts, prompts) if 'prompt' in t.needs else (images, paths)
        items = [(x, str(name)) for x, name in zip(inputs, names) for _ in range(args.n)]
        outs, labels = [], []
        nb = -(-len(items) // args.batch_size)
        bar.reset(total=nb * steps)
        for k in range(nb):
            chunk = items[k * args.batch_size:(k + 1) * args.batch_size]
            pad = args.batch_size - len(chunk) if nb > 1 else 0  # same shapes: no recompile
            xs = [x for x, _ in chunk] + [chunk[-1][0]] * pad
            progress.last = 0
            bar.set_description(f'{args.task} batch {k + 1}/{nb}')
            outs.extend(list(call(xs, 1, seed=args.seed + k * args.batch_size,
                                  progress=progress, **kw))[:len(chunk)])
            labels.extend(name for _, name in chunk)
        texts = isinstance(outs[0], str)
        return labels, (None if texts else np.stack(outs)), (outs if texts else None)
    bar.reset(total=steps * (2 if args.task == 'i2t2i' else 1))
    first = prompts[0] if prompts else None
    if args.task == 'dual':
        out = call(first, images[0], args.n, progress=progress, seed=args.seed, **kw)
    elif args.task == 'multi':
        masks = [None if m.lower() == 'none' else load_image(m) for m in args.mask] or None
        out = call(images, prompt=first, n=args.n, masks=masks, progress=progress,
                   seed=args.seed, **kw)
    else:
        out = call(images[0], n=args.n, progress=progress, seed=args.seed, **kw)
    labels = [paths[0] if len(paths) == 1 else args.task] * args.n  # the input, in texts.json
    if args.task == 'i2t2i':
        return labels, out[1], out[0]
    return labels, out, None


def main(argv=None) -> int:
    from vd_jax.platform import EXIT_USAGE, quiet_libraries
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        t, prompts, paths = validate(args, parser)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    import warnings
    import jax
    from vd_jax.checkpoint import CheckpointError
    from vd_jax.image_io import ImageReadError, load_image
    from vd_jax.outputs import code_version, new_run_dir, progress_bar, write_results
    from vd_jax.tokenizers import PromptTruncatedWarning
    from vd_jax.pipeline import DEFAULT_MODEL, TaskError, VersatileDiffusion
    cache = _compile_cache(args)
    try:
        kw = dict(dtype=args.dtype, uncond=args.uncond)
        if args.ckpt:
            vd = VersatileDiffusion.from_checkpoint(args.ckpt, **kw)
        elif args.config:
            vd = VersatileDiffusion.random(args.config, **kw)
        else:
            vd = VersatileDiffusion.default(args.model or DEFAULT_MODEL, **kw)
        untrained = vd.source.startswith('random:')
        if untrained:
            print(UNTRAINED, file=sys.stderr)
        vd.check_task(t.method)
        images = [load_image(p) for p in paths]
        print(f'loaded {vd.source} in {time.time() - t0:.1f}s; devices: {jax.devices()}',
              file=sys.stderr)
        if 'ctx_text' in vd.params:
            warn_truncated_prompts(vd, args, prompts)
        with progress_bar(args.task) as bar, warnings.catch_warnings():
            warnings.simplefilter('ignore', PromptTruncatedWarning)  # reported above
            labels, out_images, out_texts = run_task(vd, t, args, prompts, images, paths, bar)
    except (TaskError, CheckpointError, ImageReadError) as e:
        print(f'error: {e}', file=sys.stderr)  # after the progress bar closed its line
        return EXIT_USAGE
    out_dir = new_run_dir(args.out)
    settings = dict(vars(args), task_name=t.method, prompts=prompts, image_files=paths,
                    checkpoint=vd.source, untrained=untrained, code_version=code_version(),
                    jax_version=jax.__version__, backend=jax.default_backend(),
                    compile_cache=cache, seconds=round(time.time() - t0, 2))
    inputs = None
    if images and out_images is not None and args.task in ('i2i', 'disentangle', 'dual'):
        from vd_jax.tasks.common import load_images
        inputs = load_images(images[:1], out_images.shape[1:3])
    written = write_results(out_dir, settings, images=out_images, texts=out_texts, labels=labels,
                            inputs=inputs)
    print(f"wrote {out_dir}: {len(written['images'])} image(s)"
          f"{', grid.png' if written['grid'] else ''}"
          f"{', texts.json/texts.txt' if written['texts'] else ''}, settings.json")
    for line in out_texts or ():
        print(f'  {line}')
    if untrained:
        print(UNTRAINED)
    return 0

