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
import sys
import time
from typing import List, Tuple

from vd_jax.cli.distributed import check_parallel, make_mesh, shared_run_dir, start_processes
from vd_jax.cli.model_flags import add_model_flags, check_model_flags, load_model, model_config
from vd_jax.cli.sample_run import sample, schedule_record, write
from vd_jax.cli.sample_tasks import COMMON, TASKS, CliTask
from vd_jax.cli.usage import check_out, compile_cache, read_list, report
from vd_jax.errors import CheckpointError, ConfigError, InputError
from vd_jax.image_io import load_image
from vd_jax.outputs import code_version, new_run_dir
from vd_jax.platform import exit_codes_epilog, quiet_libraries
from vd_jax.sampling_flags import add_sampler_flags, model_grid_notice, resolve_scale

DEMO_PROMPT = 'a large red circle at the center on a white background'  # the shapes world
UNTRAINED = ('UNTRAINED MODEL: random weights (--model tiny / --config), the outputs are noise; '
             'this run only proves that the install works.')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='sample.py', description=__doc__, epilog=exit_codes_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    add_model_flags(p, dtype_choices=False)  # --ckpt, --model, --config, --dtype (checked below)
    a('--task', default=None, choices=sorted(TASKS), help='what to run (default t2i)')
    a('--prompt', action='append', default=[], help='a prompt (repeatable)')
    a('--prompts', help='a text file with one prompt per line')
    a('--image', action='append', default=[], help='an input image file (repeatable)')
    a('--images', help='a text file with one image path per line')
    a('--n', type=int, default=4, help='samples per input (default 4)')
    a('--steps', type=int, default=50)
    add_sampler_flags(p)  # --scale, --sampler, --spacing, --karras, --guidance-rescale
    a('--eta', type=float, default=0.0, help='DDIM eta (>= 0)')
    a('--seed', type=int, default=0, help='sample i uses seed + i (0 <= seed < 2^32)')
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
# Checks before any model is loaded (modules of the pipeline are imported inside the functions:
# usage errors and --help answer before JAX loads, ~7 s of imports on a 2-core CPU host)
# ------------------------------------------------------------------------------------------------

def _check_values(args) -> None:
    """Numeric flags, with the Python API's own checks (and messages) where it has them
    (--steps: `check_steps` in `validate`, naming the sampler)."""
    # lazy: vd_jax.tasks.common pulls in jax, flax (+1.2 s)
    from vd_jax.tasks.common import SamplingOptions, check_n  # noqa: PLC0415
    api = [('n', lambda: check_n(args.n))] + [
        (f, lambda f=f: SamplingOptions(**{f: getattr(args, f)}))
        for f in ('eta', 'seed', 'dtype')]
    for flag, check in api:
        try:
            check()
        except InputError as e:
            raise InputError(f'--{flag}: {e}') from None
    for flag, ok, want in (('batch-size', args.batch_size >= 1, 'an integer >= 1'),
                           ('mix', 0 <= args.mix <= 1, 'in [0, 1]'),
                           ('temperature', args.temperature > 0, '> 0'),
                           ('fidelity', 0 <= args.fidelity <= 1, 'in [0, 1]'),
                           ('focus', args.focus is None or 0 <= args.focus <= 1, 'in [0, 1]')):
        if not ok:
            raise InputError(f'--{flag}: must be {want}, got {getattr(args, flag.replace("-", "_"))}')


def validate(args, parser) -> Tuple[CliTask, List[str], List[str]]:
    """Everything checkable without a model: (task, prompts, image paths). Raises InputError."""
    explicit_task, args.task = args.task is not None, args.task or 't2i'
    t = TASKS[args.task]
    defaults = parser.parse_args([])
    for name in sorted(set(vars(args)) - COMMON - set(t.flags)):
        if getattr(args, name) != getattr(defaults, name):
            print(f"warning: --{name.replace('_', '-')} is ignored by --task {args.task}",
                  file=sys.stderr)
    _check_values(args)
    # (args.spacing stays as given: 'auto' is resolved with the model's schedule, which a
    # zero-terminal-SNR v-prediction model turns into 'trailing': diffusion.plan.make_plan;
    # a note that depends on it is given once the model has loaded, `_load_model`)
    _, notice = model_grid_notice(args, None, before_load=True)
    if notice:
        print(f'note: {notice}', file=sys.stderr)
    prompts = list(args.prompt) + (read_list(args.prompts, '--prompts') if args.prompts else [])
    listed = read_list(args.images, '--images') if args.images else []
    paths = list(args.image) + listed
    if 'prompt' in t.needs and not prompts:
        # the demo prompt is for a plain `python sample.py` (what the README's first command
        # runs); anything more specific without a prompt is a mistake to report
        if args.ckpt or args.config or explicit_task or paths:
            raise InputError(f'--task {args.task} needs a prompt (--prompt TEXT or --prompts FILE)')
        print(f'no --prompt given: using the demo prompt {DEMO_PROMPT!r}', file=sys.stderr)
        prompts = [DEMO_PROMPT]
    if 'image' in t.needs and not paths:
        raise InputError(f'--task {args.task} needs an input image (--image FILE or --images FILE)')
    masks = [m for m in args.mask if m.lower() != 'none']
    if args.mask and len(args.mask) != len(paths):
        raise InputError(f'{len(args.mask)} --mask for {len(paths)} --image (give one per image, '
                         "or 'none')")
    flags = ['--image'] * len(args.image) + [f"--images '{args.images}'"] * len(listed) + \
        ['--mask'] * len(masks)
    for flag, p in zip(flags, paths + masks):
        try:
            load_image(p)
        except (InputError, FileNotFoundError) as e:
            raise InputError(f'{flag}: {e}') from None
    check_model_flags(args)
    notice = resolve_scale(args, model_config(args.ckpt, model=args.model, config=args.config))
    if notice:
        print(f'note: {notice}', file=sys.stderr)
    check_out(args.out)
    check_parallel(args)
    # lazy: vd_jax.lora.stack pulls in jax (+1.1 s)
    from vd_jax.lora.stack import parse_lora_flag  # noqa: PLC0415
    try:
        args.lora = [parse_lora_flag(x) for x in args.lora]
    except (ConfigError, CheckpointError) as e:
        raise InputError(f'--lora: {e}') from None
    return t, prompts, paths


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def _load_model(args, mesh, share, t0):
    """The model `--ckpt`/`--config`/`--model` names, on `mesh`; says where it runs."""
    # lazy: jax (+1.0 s)
    import jax  # noqa: PLC0415
    vd = load_model(args.ckpt, model=args.model, config=args.config, dtype=args.dtype,
                    uncond=args.uncond, mesh=mesh)
    if vd.source.startswith('random:') and share[0] == 0:
        print(UNTRAINED, file=sys.stderr)
    for path, scale in args.lora:
        print(f"LoRA '{vd.load_lora(path, scale=scale)}' at scale {scale:g}", file=sys.stderr)
    where = (f'process {share[0]}/{share[1]}, ' if args.distributed else '') + (
        f'mesh {dict(mesh.shape)} of {mesh.devices.size} device(s)' if mesh is not None
        else f'device {jax.local_devices()[0]}')
    print(f'loaded {vd.source} in {time.time() - t0:.1f}s; {where}', file=sys.stderr)
    args.spacing_used, notice = model_grid_notice(args, vd.schedule, before_load=False)
    if notice:
        print(f'note: {notice}', file=sys.stderr)
    return vd


def main(argv=None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        t, prompts, paths = validate(args, parser)
    except (InputError, CheckpointError) as e:  # CheckpointError: a model's broken config
        return report(e)
    import jax  # noqa: PLC0415
    cache = compile_cache(not args.no_compile_cache)
    share = start_processes(args)
    try:
        mesh = make_mesh(args)
    except ValueError as e:
        return report(f'--mesh {args.mesh}: {e}')
    # one run folder: made now when several processes share it (process 0 makes it) or
    # previews go into it; else once the samples exist (a failed run leaves nothing behind)
    out_dir = [shared_run_dir(args.out, share) if args.distributed else None]

    def run_dir() -> str:
        if out_dir[0] is None:
            out_dir[0] = new_run_dir(args.out)
        return out_dir[0]
    try:
        vd = _load_model(args, mesh, share, t0)
        result = sample(vd, t, args, prompts, paths, share, run_dir)
    except (InputError, CheckpointError, ConfigError) as e:
        return report(e)  # after the progress bar closed its line
    untrained = vd.source.startswith('random:')
    settings = dict(vars(args), task_name=t.method, prompts=prompts, image_files=paths,
                    checkpoint=vd.source, untrained=untrained, code_version=code_version(),
                    jax_version=jax.__version__, backend=jax.default_backend(),
                    compile_cache=cache, seconds=round(time.time() - t0, 2),
                    mesh=None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
                    processes=share[1], schedule=schedule_record(vd))
    written, out_texts = write(t, args, settings, share, run_dir, result)
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
