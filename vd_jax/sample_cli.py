"""The sampling command line (`python sample.py ...`): flags -> pipeline -> files on disk.

Every run writes into a new `OUT/run-NNN/` folder (earlier runs are never overwritten):
one PNG per image, `grid.png`, `texts.json`/`texts.txt` for text outputs, and
`settings.json` with every setting, the checkpoint and the code version. Every flag, input
file and the output folder are checked before any model is loaded; usage errors exit with
code 2 and one `error: ...` line, and nothing is written.

Devices: `--mesh data=N,fsdp=M` (default data=-1 over this process's devices when it has
several) splits every batch over data x fsdp and shards the parameters over fsdp (for chips
that cannot hold the whole model). Several hosts: `--distributed` (+ `--coordinator HOST:PORT
--num_processes N --process_id I` where the cluster does not provide them): every process
samples its share of the inputs on a mesh of its own devices (inference needs no traffic
between hosts; the model must fit on one host's devices, sharded over fsdp if need be) and
writes its files, named by global sample index, into the one run folder process 0 made;
process 0 then writes grid.png, texts.json/texts.txt and settings.json for all of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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
          'batch_size', 'out', 'uncond', 'spacing', 'no_compile_cache', 'mesh', 'distributed',
          'coordinator', 'num_processes', 'process_id', 'preview_every', 'lora'}


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
                   ('image', 'images', 'fidelity', 'start_step', 'focus', 'color_adjust') + IMG,
                   True,
                   lambda a: dict(fidelity=a.fidelity, start_step=a.start_step, focus=_focus(a),
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
    a('--start-step', type=int, default=None,
      help='i2i: start from the input noised to this ascending DDIM grid index (fidelity f is '
           'int(steps * (1 - f))); not with --fidelity')
    a('--preview-every', type=int, default=None, metavar='N',
      help='write the decoded intermediate latents every N steps into the run folder '
           '(preview_step_010.png; text outputs: .txt)')
    a('--lora', action='append', default=[], metavar='PATH[:SCALE]',
      help='a LoRA adapter of the diffuser (a vd_jax adapter file from train.py, or a '
           'diffusers/PEFT file), scale 1 by default; repeatable: adapters add up')
    a('--mesh', default=None,
      help="device mesh over this process's devices, e.g. data=8 or data=2,fsdp=4 (axes data, "
           'fsdp, model; -1 = all remaining devices): batches split over data x fsdp, '
           'parameters sharded over fsdp/model. Default: data=-1 when there are several '
           "devices; 'none': one device")
    a('--distributed', action='store_true',
      help='several processes (hosts): call jax.distributed.initialize; each process samples '
           'its share of the inputs on its own devices, all write into one run folder')
    a('--coordinator', default=None, help='--distributed: HOST:PORT of process 0')
    a('--num_processes', type=int, default=None, help='--distributed: number of processes')
    a('--process_id', type=int, default=None, help='--distributed: this process, 0..N-1')
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
    _check_parallel(args)
    from vd_jax.lora.stack import LoraError, parse_lora_flag
    try:
        args.lora = [parse_lora_flag(x) for x in args.lora]
    except LoraError as e:
        raise UsageError(f'--lora: {e}') from None
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


def _check_parallel(args) -> None:
    """--mesh, --distributed and its companions, --preview-every, --start-step."""
    if args.mesh is not None and args.mesh.lower() != 'none':
        from vd_jax.pipeline import parse_mesh
        try:
            parse_mesh(args.mesh)
        except ValueError as e:
            raise UsageError(f'--mesh: {e}') from None
    given = [f for f in ('coordinator', 'num_processes', 'process_id')
             if getattr(args, f) is not None]
    if given and not args.distributed:
        raise UsageError(f"--{given[0]} needs --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f'--num_processes {args.num_processes} must be >= 1')
    if args.process_id is not None and not (
            0 <= args.process_id < (args.num_processes or args.process_id + 1)):
        raise UsageError(f'--process_id {args.process_id} must be in [0, --num_processes)')
    if args.preview_every is not None and args.preview_every < 1:
        raise UsageError(f'--preview-every {args.preview_every} must be >= 1')
    if args.start_step is not None:
        if args.start_step < 0:
            raise UsageError(f'--start-step {args.start_step} must be >= 0')
        if args.fidelity:
            raise UsageError('give --fidelity or --start-step, not both')


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


def run_task(vd, t: CliTask, args, prompts, images, paths, bar, share: Tuple[int, int] = (0, 1),
             preview: Optional[Callable] = None
             ) -> Tuple[List[str], Optional[np.ndarray], Optional[List[str]], List[int]]:
    """Call the pipeline; returns (a label per output, images or None, texts or None, the
    global sample index of each output).

    share = (process index, process count): batched tasks run the process's contiguous block
    of the batches (the same batches and seeds as one process runs), the others a contiguous
    block of the n samples (sample i keeps seed + i). preview(tag, first seed) -> a
    callback(step, latents) for the denoising runs of one call (`--preview-every`)."""
    from vd_jax.image_io import load_image
    call = getattr(vd, t.method)
    kw = dict(t.kwargs(args), steps=args.steps, scale=args.scale, sampler=args.sampler,
              eta=args.eta, spacing=args.spacing)
    me, count = share

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
        outs, labels, index = [], [], []
        nb = -(-len(items) // args.batch_size)
        mine = range(me * nb // count, (me + 1) * nb // count)
        bar.reset(total=len(mine) * steps)
        for k in mine:
            lo = k * args.batch_size
            chunk = items[lo:lo + args.batch_size]
            pad = args.batch_size - len(chunk) if nb > 1 else 0  # same shapes: no recompile
            xs = [x for x, _ in chunk] + [chunk[-1][0]] * pad
            progress.last = 0
            bar.set_description(f'{args.task} batch {k + 1}/{nb}')
            extra = {} if preview is None else dict(
                callback=preview(f'batch{k + 1:03d}_' if nb > 1 else '', args.seed + lo))
            outs.extend(list(call(xs, 1, seed=args.seed + lo, progress=progress, **kw,
                                  **extra))[:len(chunk)])
            labels.extend(name for _, name in chunk)
            index.extend(range(lo, lo + len(chunk)))
        texts = bool(outs) and isinstance(outs[0], str)
        arr = None if texts or not outs else np.stack(outs)
        return labels, arr, (outs if texts else None), index
    lo, hi = me * args.n // count, (me + 1) * args.n // count
    if hi == lo:
        return [], None, None, []
    bar.reset(total=steps * (2 if args.task == 'i2t2i' else 1))
    first = prompts[0] if prompts else None
    extra = {} if preview is None else dict(
        callback=preview(f'proc{me}_' if count > 1 else '', args.seed + lo))
    kw.update(extra, progress=progress, seed=args.seed + lo)
    if args.task == 'dual':
        out = call(first, images[0], hi - lo, **kw)
    elif args.task == 'multi':
        masks = [None if m.lower() == 'none' else load_image(m) for m in args.mask] or None
        out = call(images, prompt=first, n=hi - lo, masks=masks, **kw)
    else:
        out = call(images[0], n=hi - lo, **kw)
    labels = [paths[0] if len(paths) == 1 else args.task] * (hi - lo)  # the input, in texts.json
    index = list(range(lo, hi))
    if args.task == 'i2t2i':
        return labels, out[1], out[0], index
    return labels, out, None, index


def _start_processes(args) -> Tuple[int, int]:
    """--distributed: jax.distributed.initialize (as train.py; CPU collectives over gloo).
    Returns (process index, process count)."""
    import jax
    if not args.distributed:
        return 0, 1
    if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
        # CPU devices of different processes need a collectives backend (the barrier and the
        # run folder's broadcast); harmless on TPU/GPU hosts, where it only concerns the CPU
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    return jax.process_index(), jax.process_count()


def _make_mesh(args):
    """The mesh of this process's devices (`--mesh`; default data=-1 over several devices)."""
    import jax
    spec = args.mesh
    if spec is None:
        spec = 'data=-1' if jax.local_device_count() > 1 else 'none'
    if spec.lower() == 'none':
        return None
    from vd_jax.pipeline import as_mesh
    return as_mesh(spec)


def _shared_run_dir(root: str, share: Tuple[int, int]) -> str:
    """One new run folder for all processes: process 0 creates it, the others learn its path
    (a broadcast over the processes' devices)."""
    from jax.experimental import multihost_utils
    from vd_jax.outputs import new_run_dir
    path = new_run_dir(root) if share[0] == 0 else ''
    raw = np.zeros(4096, np.uint8)
    data = os.path.abspath(path).encode() if path else b''
    raw[:len(data)] = np.frombuffer(data, np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw != 0]).decode()


class Previews:
    """`--preview-every N`: a callback per denoising call that decodes the latents after
    every N-th step and writes them into the run folder: images as one grid
    `preview_<tag>step_010.png`, sentences as `preview_<tag>step_010.txt`."""

    def __init__(self, vd, args, run_dir: Callable[[], str]):
        self.vd, self.args, self.run_dir = vd, args, run_dir
        self.written: List[str] = []

    def __call__(self, tag: str, seed: int) -> Callable:
        """The callback of one call whose samples start at `seed` (sentences decode with
        seed + i, as the call's own outputs)."""
        def callback(step, latents):
            done = int(step) + 1  # grid positions are 0-based
            if done % self.args.preview_every:
                return
            from vd_jax.outputs import make_grid, save_png
            comps = self.vd.components
            base = os.path.join(self.run_dir(), f'preview_{tag}step_{done:03d}')
            if latents.ndim == 2:  # text latents
                texts = comps.decode_latent('text', latents, seed=seed, method=self.args.decode,
                                            temperature=self.args.temperature)
                with open(base + '.txt', 'x') as f:
                    f.write('\n'.join(texts) + '\n')
                self.written.append(base + '.txt')
            else:
                save_png(base + '.png', make_grid(comps.decode_latent('image', latents)),
                         {'step': done, 'task': self.args.task})
                self.written.append(base + '.png')
        return callback


def _write_share(out_dir, settings, share, labels, out_images, out_texts, index) -> None:
    """--distributed, every process: its images as <global index>.png and a part record
    (labels, texts, files) for process 0 to merge."""
    import json
    from vd_jax.outputs import save_png
    files = []
    for i, gi in enumerate(index):
        if out_images is not None:
            p = os.path.join(out_dir, f'{gi:04d}.png')
            save_png(p, out_images[i], dict(settings, index=gi, label=labels[i]))
            files.append(p)
    with open(os.path.join(out_dir, f'part-{share[0]:03d}.json'), 'x') as f:
        json.dump({'index': index, 'labels': labels, 'texts': out_texts, 'images': files}, f)


def _merge_shares(out_dir, settings, share, inputs) -> Tuple[dict, Optional[List[str]]]:
    """--distributed, process 0 after every process wrote its share: grid.png,
    texts.json/texts.txt and the one settings.json listing every output. Returns (the
    outputs {kind: paths}, all sentences or None); inputs(hw) -> the input image for the
    grid, or None."""
    import json
    from PIL import Image
    from vd_jax.outputs import make_grid, save_png, write_results
    index, labels, texts, files = [], [], [], []
    for k in range(share[1]):
        part = os.path.join(out_dir, f'part-{k:03d}.json')
        with open(part) as f:
            rec = json.load(f)
        index += rec['index']
        labels += rec['labels']
        texts += rec['texts'] or []
        files += rec['images']
        os.remove(part)
    order = np.argsort(index, kind='stable')
    labels = [labels[i] for i in order]
    grid = None
    if files:
        files = [files[i] for i in order]
        ims = np.stack([np.asarray(Image.open(p).convert('RGB'), np.float32) / 255.0
                        for p in files])
        grid = os.path.join(out_dir, 'grid.png')
        save_png(grid, make_grid(ims if inputs is None else np.concatenate(
            [inputs(ims.shape[1:3]), ims])), settings)
    texts = [texts[i] for i in order] if texts else None
    previews = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                      if f.startswith('preview_'))
    written = write_results(out_dir, settings, texts=texts, labels=labels,
                            elsewhere={'images': files, 'grid': grid, 'previews': previews})
    return dict(written, images=files, grid=grid), texts


def _load_model(args, mesh, share, t0):
    """The model `--ckpt`/`--config`/`--model` names, on `mesh`; says where it runs."""
    import jax
    from vd_jax.pipeline import DEFAULT_MODEL, VersatileDiffusion
    kw = dict(dtype=args.dtype, uncond=args.uncond, mesh=mesh)
    if args.ckpt:
        vd = VersatileDiffusion.from_checkpoint(args.ckpt, **kw)
    elif args.config:
        vd = VersatileDiffusion.random(args.config, **kw)
    else:
        vd = VersatileDiffusion.default(args.model or DEFAULT_MODEL, **kw)
    if vd.source.startswith('random:') and share[0] == 0:
        print(UNTRAINED, file=sys.stderr)
    for path, scale in args.lora:
        print(f"LoRA '{vd.load_lora(path, scale=scale)}' at scale {scale:g}", file=sys.stderr)
    where = (f'process {share[0]}/{share[1]}, ' if args.distributed else '') + (
        f'mesh {dict(mesh.shape)} of {mesh.devices.size} device(s)' if mesh is not None
        else f'device {jax.local_devices()[0]}')
    print(f'loaded {vd.source} in {time.time() - t0:.1f}s; {where}', file=sys.stderr)
    return vd


def _sample(vd, t, args, prompts, paths, share, run_dir):
    """Run the task with a progress bar; returns (labels, images, texts, index, previews)."""
    import warnings
    from vd_jax.image_io import load_image
    from vd_jax.outputs import progress_bar
    from vd_jax.tokenizers import PromptTruncatedWarning
    vd.check_task(t.method)
    images = [load_image(p) for p in paths]
    previews = None if args.preview_every is None else Previews(vd, args, run_dir)
    if 'ctx_text' in vd.params and share[0] == 0:
        warn_truncated_prompts(vd, args, prompts)
    with progress_bar(args.task) as bar, warnings.catch_warnings():
        warnings.simplefilter('ignore', PromptTruncatedWarning)  # reported above
        out = run_task(vd, t, args, prompts, images, paths, bar, share=share, preview=previews)
    return (images, *out, previews)


def _write(args, settings, share, run_dir, images, labels, out_images, out_texts, index,
           previews):
    """Write this process's outputs (merged into one run folder by process 0 when
    distributed); returns what `write_results` wrote, or None on processes other than 0."""
    from vd_jax.outputs import write_results
    from vd_jax.tasks.common import load_images
    inputs = None  # hw -> the input image beside the outputs in grid.png
    if images and args.task in ('i2i', 'disentangle', 'dual'):
        inputs = functools.partial(load_images, images[:1])
    if not args.distributed:
        return write_results(
            run_dir(), settings, images=out_images, texts=out_texts, labels=labels,
            inputs=None if out_images is None or inputs is None else inputs(out_images.shape[1:3]),
            elsewhere={'previews': previews.written} if previews else None), out_texts
    from jax.experimental import multihost_utils
    _write_share(run_dir(), dict(settings, process_index=share[0]), share, labels,
                 out_images, out_texts, index)
    multihost_utils.sync_global_devices('vd_jax sample.py: every share written')
    if share[0] != 0:
        print(f'process {share[0]}: wrote {len(index)} output(s) into {run_dir()}')
        return None, out_texts
    return _merge_shares(run_dir(), settings, share, inputs)


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
    import jax
    from vd_jax.checkpoint import CheckpointError
    from vd_jax.image_io import ImageReadError
    from vd_jax.outputs import code_version, new_run_dir
    from vd_jax.lora import LoraError
    from vd_jax.pipeline import TaskError
    cache = _compile_cache(args)
    share = _start_processes(args)
    try:
        mesh = _make_mesh(args)
    except ValueError as e:
        print(f'error: --mesh {args.mesh}: {e}', file=sys.stderr)
        return EXIT_USAGE
    # one run folder: made now when several processes share it (process 0 makes it) or
    # previews go into it; else once the samples exist (a failed run leaves nothing behind)
    out_dir = [_shared_run_dir(args.out, share) if args.distributed else None]

    def run_dir() -> str:
        if out_dir[0] is None:
            out_dir[0] = new_run_dir(args.out)
        return out_dir[0]
    try:
        vd = _load_model(args, mesh, share, t0)
        images, labels, out_images, out_texts, index, previews = _sample(
            vd, t, args, prompts, paths, share, run_dir)
    except (TaskError, CheckpointError, ImageReadError, LoraError) as e:
        print(f'error: {e}', file=sys.stderr)  # after the progress bar closed its line
        return EXIT_USAGE
    untrained = vd.source.startswith('random:')
    settings = dict(vars(args), task_name=t.method, prompts=prompts, image_files=paths,
                    checkpoint=vd.source, untrained=untrained, code_version=code_version(),
                    jax_version=jax.__version__, backend=jax.default_backend(),
                    compile_cache=cache, seconds=round(time.time() - t0, 2),
                    mesh=None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
                    processes=share[1])
    written, out_texts = _write(args, settings, share, run_dir, images, labels, out_images,
                                out_texts, index, previews)
    if written is None:
        return 0
    print(f"wrote {run_dir()}: {len(written['images'])} image(s)"
          f"{', grid.png' if written['grid'] else ''}"
          f"{', texts.json/texts.txt' if written['texts'] else ''}, settings.json")
    for line in out_texts or ():
        print(f'  {line}')
    if untrained:
        print(UNTRAINED)
    return 0
