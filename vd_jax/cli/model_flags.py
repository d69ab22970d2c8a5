"""The model flags of every command line and `load_model`, the one place they become a model.

  --ckpt DIR     a vd_jax checkpoint folder (`python -m vd_jax.convert`, or a training export)
  --model NAME   a model shipped in the package (`vd_jax.pipeline.MODELS`; default vd-mini)
  --config NAME  a config with random (untrained) weights: a smoke test of the install
  --dtype        the compute dtype, float32 or bfloat16

Each command line offers the subset it needs (`add_model_flags`); `check_model_flags` checks
them before any model loads.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from vd_jax.errors import InputError
from vd_jax.platform import CPU_BFLOAT16_MEASURED

DEFAULT_MODEL_SEED = 0  # the seed of a --config model's random weights
MODEL_FLAGS = ('ckpt', 'model', 'config')


def add_model_flags(p: argparse.ArgumentParser, flags: Sequence[str] = MODEL_FLAGS, *,
                    dtype_choices: bool = True, random_seed: bool = False) -> None:
    """Add --ckpt and the others of `flags` (a subset of MODEL_FLAGS), and --dtype.

    dtype_choices: argparse checks --dtype (else the caller does, e.g. with
    `SamplingOptions`); random_seed: also --seed-model, the seed of --config's weights."""
    p.add_argument('--ckpt', help='vd_jax checkpoint folder (python -m vd_jax.convert ..., or a '
                                  'training export); default: the shipped vd-mini model')
    if 'model' in flags:
        p.add_argument('--model', default=None,
                       help="a model shipped in the package, instead of --ckpt: 'vd-mini' (the "
                            "default, trained on the shapes world) or 'tiny' (random weights, a "
                            'smoke test)')
    if 'config' in flags:
        p.add_argument('--config', default=None,
                       help='instead of --ckpt: random (untrained) weights of this config (a '
                            'smoke test), e.g. tiny or vd_dc:tiny')
    if random_seed:
        p.add_argument('--seed-model', type=int, default=DEFAULT_MODEL_SEED,
                       help='with --config: the seed of the random weights')
    p.add_argument('--dtype', default='float32',
                   choices=['float32', 'bfloat16'] if dtype_choices else None,
                   help='compute dtype: float32 (default) or bfloat16 (on a CPU backend '
                        f'bfloat16 is slower, measured {CPU_BFLOAT16_MEASURED})')


def _one_of(flags: Sequence[str]) -> str:
    names = [f'--{f}' for f in flags]
    return ', '.join(names[:-1]) + ' and ' + names[-1]


def check_model_flags(args: argparse.Namespace, flags: Sequence[str] = MODEL_FLAGS) -> None:
    """At most one of `flags` given, a shipped --model name, a --ckpt folder holding a
    config.json. Raises InputError."""
    if sum(getattr(args, f) is not None for f in flags) > 1:
        raise InputError(f'give one of {_one_of(flags)}')
    # lazy: vd_jax.pipeline pulls in jax, flax (+1.6 s)
    from vd_jax.pipeline import MODELS  # noqa: PLC0415
    model = getattr(args, 'model', None) if 'model' in flags else None
    if model is not None and model not in MODELS:
        raise InputError(f'--model {model!r}: shipped models are {sorted(MODELS)}')
    if args.ckpt is not None and not os.path.isfile(os.path.join(args.ckpt, 'config.json')):
        raise InputError(f"--ckpt '{args.ckpt}' is not a vd_jax checkpoint folder (no config.json)")


def model_id(ckpt: Optional[str], model: Optional[str] = None) -> str:
    """What names the model in records: the checkpoint folder (absolute), else the shipped
    model's name."""
    from vd_jax.pipeline import DEFAULT_MODEL  # noqa: PLC0415
    return os.path.abspath(ckpt) if ckpt else (model or DEFAULT_MODEL)


def load_model(ckpt: Optional[str] = None, *, model: Optional[str] = None,
               config: Optional[str] = None, seed: int = DEFAULT_MODEL_SEED,
               dtype: str = 'float32', uncond: str = 'v1.0', mesh=None, loras=()):
    """The model the flags name: the checkpoint folder `ckpt`, else random weights of
    `config` (seeded by `seed`), else the shipped model `model` (default: VD-mini).

    dtype: the compute dtype; uncond: the unconditional-context convention; mesh: a
    `jax.sharding.Mesh` to shard the parameters and batches over (None: one device);
    loras: (path, scale) LoRA adapters of the diffuser to load (`--lora`).
    Returns a `vd_jax.pipeline.VersatileDiffusion`; a missing or broken checkpoint raises
    `vd_jax.errors.CheckpointError`.
    """
    from vd_jax.pipeline import DEFAULT_MODEL, VersatileDiffusion  # noqa: PLC0415
    kw = dict(dtype=dtype, uncond=uncond, mesh=mesh)
    if ckpt:
        vd = VersatileDiffusion.from_checkpoint(ckpt, **kw)
    elif config:
        vd = VersatileDiffusion.random(config, seed, **kw)
    else:
        vd = VersatileDiffusion.default(model or DEFAULT_MODEL, **kw)
    for path, scale in loras:
        vd.load_lora(path, scale=scale)
    return vd


def model_config(ckpt: Optional[str] = None, *, model: Optional[str] = None,
                 config: Optional[str] = None):
    """The config of the model the flags name (as `load_model`), read without loading any
    weights: what a command line checks before the long work (e.g. the guidance scale the
    model recommends). None for a shipped model with random weights ('tiny')."""
    from vd_jax.checkpoint import read_config  # noqa: PLC0415
    from vd_jax.config import load_config  # noqa: PLC0415
    from vd_jax.pipeline import DEFAULT_MODEL, MODELS  # noqa: PLC0415
    if ckpt:
        return read_config(ckpt)
    if config:
        return load_config(config)
    folder = MODELS.get(model or DEFAULT_MODEL)
    return None if folder is None else read_config(folder)
