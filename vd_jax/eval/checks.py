"""Checks of `python -m vd_jax.eval` before any model loads: every flag, input list,
reference and output location; a problem is a `vd_jax.errors.InputError` (exit code 2).
Modules that load JAX (shapes_eval, fid) are imported inside the functions: usage errors
answer before it loads (~5 s of imports on a 2-core CPU host).
"""
from __future__ import annotations

import os
import sys

from vd_jax.cli.model_flags import check_model_flags, model_config, model_id
from vd_jax.cli.usage import check_at_least_one, check_out
from vd_jax.config import load_config
from vd_jax.errors import InputError
from vd_jax.eval import generate as G
from vd_jax.eval.reference import list_images
from vd_jax.sampling_flags import check_sampler_flags, resolve_scale

SAMPLE_COMMANDS = ('fid', 'clip')
EVAL_MODEL_FLAGS = ('ckpt', 'model')  # eval's --config is a config of its flags, not a model


def apply_config(args, parser, argv):
    """--config FILE: its keys become the defaults of the command's flags; flags given win."""
    try:
        cfg = load_config(args.config)
    except (ValueError, FileNotFoundError, SyntaxError) as e:
        raise InputError(f'--config {args.config}: {e}') from None
    sub = parser.commands[args.command]
    known = {a.dest for a in sub._actions}
    every = set().union(*({a.dest for a in parser.commands[c]._actions} for c in SAMPLE_COMMANDS))
    bad = sorted(set(cfg.keys()) - every - {'help'})
    if bad:
        raise InputError(f'--config {args.config}: unknown keys {bad} (keys are flag names with '
                         "'_', e.g. ref_images)")
    sub.set_defaults(**{k: v for k, v in cfg.items() if k in known})
    return parser.parse_args(argv)


def check_inception(path):
    """--inception: a converted folder, its inception.safetensors, or the .pth."""
    if not path:
        raise InputError('--inception is required: the FID Inception weights (a converted folder, '
                         'inception.safetensors, or pt_inception-2015-12-05-6726825d.pth)')
    if not os.path.exists(path):
        raise InputError(f"--inception '{path}' does not exist")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'inception.safetensors')):
            raise InputError(f"--inception '{path}' has no inception.safetensors (convert the "
                             f'weights: python -m vd_jax.convert pt_inception-...pth {path})')
    elif not path.endswith(('.safetensors', '.pth', '.pt')):
        raise InputError(f"--inception '{path}': expected a folder, .safetensors or .pth")


def check_stats_out(path):
    """A statistics file to write: a new .npz in a writable folder."""
    if not path.endswith('.npz'):
        raise InputError(f"statistics output '{path}' must end in .npz")
    if os.path.exists(path):
        raise InputError(f"statistics output '{path}' already exists (not overwritten)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"statistics output '{path}': folder '{folder}' is not writable")


def check(args, parser, argv):
    """Validate everything that can be without a model; returns (the arguments, with
    --config's defaults applied, a dict of prepared inputs)."""
    prep = {}
    if args.command == 'fid-stats':
        check_inception(args.inception)
        check_stats_out(args.stats_out)
        check_at_least_one(args, ('inception_batch_size', 'n'))
        if args.size < 0:
            raise InputError('--size must be >= 0')
        prep['paths'] = list_images(args.folder)[:args.n]
        return args, prep
    if args.command in SAMPLE_COMMANDS and args.config:
        args = apply_config(args, parser, argv)
    check_at_least_one(args, ('steps', 'batch_size', 'n'))
    if args.seed < 0:
        raise InputError('--seed must be >= 0')
    check_sampler_flags(args, InputError)
    check_model_flags(args, EVAL_MODEL_FLAGS)
    notice = resolve_scale(args, model_config(args.ckpt, model=args.model))
    if notice:
        print(f'note: {notice}', file=sys.stderr)
    if args.command == 'shapes':
        # lazy: vd_jax.eval.shapes_eval pulls in tensorflow_datasets, grain, orbax, ... (+2.1 s)
        from vd_jax.eval.shapes_eval import FLOWS, PARTS  # noqa: PLC0415
        bad = [f for f in args.flows.split(',') if f not in FLOWS + PARTS]
        if bad:
            raise InputError(f'--flows: unknown {bad}; choose from {list(FLOWS + PARTS)}')
        if args.prompt_control < 0:
            raise InputError('--prompt-control must be >= 0 (bases; 0 = off)')
        check_out(args.out)
        return args, prep
    prep.update(check_sampling(args))
    if args.resume is None:
        check_out(args.out)
    return args, prep


def check_sampling(args) -> dict:
    """fid / clip: the inputs, the reference or CLIP towers, a run to resume; returns the
    prepared inputs (inputs, n, ref or ref_paths, spec)."""
    # lazy: vd_jax.eval.fid pulls in jax, flax (+1.4 s)
    from vd_jax.eval.fid import check_statistics  # noqa: PLC0415
    prep = {}
    if args.eta < 0:
        raise InputError('--eta must be >= 0')
    for flag in ('height', 'width'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f'--{flag} must be >= 1')
    if args.task == 't2i':
        if not args.prompts:
            raise InputError(f'{args.command} --task t2i needs --prompts FILE')
        inputs = G.read_prompts(args.prompts)
    else:
        if not args.images:
            raise InputError(f'{args.command} --task i2i needs --images FILE (one image '
                             'path per line)')
        inputs = G.read_image_list(args.images)
    for flag, want in (('prompts', 't2i'), ('images', 'i2i')):
        if getattr(args, flag) and args.task != want:
            print(f'warning: --{flag} is ignored by --task {args.task}', file=sys.stderr)
    n = args.n or len(inputs)
    if args.seed + n + args.batch_size >= 2 ** 32:
        raise InputError('--seed + --n must stay below 2^32 (sample i uses seed + i)')
    prep.update(inputs=inputs, n=n)
    if args.command == 'fid':
        check_inception(args.inception)
        if args.inception_batch_size < 1:
            raise InputError('--inception-batch-size must be >= 1')
        if bool(args.ref_images) == bool(args.ref_stats):
            raise InputError('fid needs exactly one of --ref-images FOLDER and --ref-stats FILE.npz')
        if n < 2:
            raise InputError('FID needs at least 2 samples (--n)')
        if args.ref_stats:
            if args.stats_out:
                raise InputError('--stats-out saves the statistics of --ref-images; with '
                                 '--ref-stats there is nothing to compute')
            prep['ref'] = check_statistics(args.ref_stats)
        else:
            prep['ref_paths'] = list_images(args.ref_images)
            if len(prep['ref_paths']) < 2:
                raise InputError(f"--ref-images '{args.ref_images}' has 1 image; FID needs "
                                 'at least 2')
        if args.stats_out:
            check_stats_out(args.stats_out)
        if args.ref_size is not None and args.ref_size < 0:
            raise InputError('--ref-size must be >= 0')
    else:
        if args.clip and not os.path.isfile(os.path.join(args.clip, 'config.json')):
            raise InputError(f"--clip '{args.clip}' is not a vd_jax checkpoint folder "
                             '(no config.json)')
        if args.clip_batch_size < 1:
            raise InputError('--clip-batch-size must be >= 1')
    spec = generation_spec(args, prep)
    prep['spec'] = spec
    if args.resume is not None:
        G.check_resume(args.resume, spec)
    return prep


def generation_spec(args, prep):
    """What decides sample i, from the flags (`vd_jax.eval.generate.GenerationSpec`)."""
    return G.GenerationSpec(model=model_id(args.ckpt, args.model), task=args.task, sampler=args.sampler,
                          steps=int(args.steps), scale=float(args.scale), eta=float(args.eta),
                          spacing=args.spacing, karras=bool(args.karras),
                          guidance_rescale=float(args.guidance_rescale),
                          seed=int(args.seed), height=args.height, width=args.width,
                          dtype=args.dtype, num_inputs=len(prep['inputs']),
                          inputs_sha256=G.inputs_digest(prep['inputs']))
