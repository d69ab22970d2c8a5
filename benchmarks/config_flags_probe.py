"""Why `train.py` keeps its own override parser instead of ml_collections' `config_flags`.

The issue asked for `config_flags` "unless measured reasons say otherwise". This probe gives the
same overrides to both, on the shipped `configs/train_tiny.py`, and prints what each made of
them: the new value, or the error. Run: `python benchmarks/config_flags_probe.py` (a second;
no model is built). The reasons are recorded in README "Training: config overrides".
"""
from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from vd_jax.config import load_config
from vd_jax.train.settings import apply_overrides

CONFIG = 'configs/train_tiny.py'
# (what a user writes to train.py, the key it sets)
CASES = (
    ('--config.optimizer.lr=3e-4', 'optimizer.lr'),
    ('--config.total_steps=20', 'total_steps'),
    ("--config.flows=['t2i','i2t']", 'flows'),                        # a list (which flows train)
    ('--config.model.diffuser.streams.image.channel_mult=[1,2]',
     'model.diffuser.streams.image.channel_mult'),
    ('--config.model.diffuser.streams.image.num_head_channels=32',    # a key whose default is None
     'model.diffuser.streams.image.num_head_channels'),
    ('--config.grad_multipliers.global=0.5', 'grad_multipliers.global'),  # a Python keyword
    ('--config.optimizer.lrr=3e-4', None),                            # a typo: named, with a hint?
)


def get(cfg, key):
    for p in key.split('.'):
        cfg = cfg[p]
    return cfg


def with_config_flags(arg: str, key):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', CONFIG, flag_values=fv, lock_config=True)
    argv = ['probe', f'--config={CONFIG}', arg]
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        fv(argv)
        return 'ok', repr(get(fv.config, key)) if key else '?'
    except BaseException as e:  # noqa: BLE001 -- absl raises SystemExit / its own errors
        return 'error', f'{type(e).__name__}: {str(e).splitlines()[0][:90]}'
    finally:
        sys.argv = saved


def with_ours(arg: str, key):
    cfg = load_config('train_tiny')
    try:
        apply_overrides(cfg, [arg])
        return 'ok', repr(get(cfg, key)) if key else '?'
    except BaseException as e:  # noqa: BLE001
        return 'error', f'{type(e).__name__}: {str(e)[:90]}'


def main() -> int:
    print('| override | config_flags | vd_jax apply_overrides |\n|---|---|---|')
    for arg, key in CASES:
        a, b = with_config_flags(arg, key), with_ours(arg, key)
        print(f'| `{arg}` | {a[0]}: {a[1]} | {b[0]}: {b[1]} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
