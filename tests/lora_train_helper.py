"""Train LoRA adapters for a few steps in a separate process and dump what the mesh test compares.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lora_train_helper.py OUT BASE \
      mesh.data=4 mesh.fsdp=2 ...

BASE: a vd_jax checkpoint folder of the `train_tiny:test` model (the frozen base). Writes
OUT/result.npz (the final adapters and their EMA, flat '/'-paths) and OUT/result.json (devices,
mesh, per-step metrics, the sharding of the frozen base's kernels and of the adapters).
"""
import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# every run of the LoRA tests (tests/test_lora_training.py) uses these settings
LORA = ['lora.enabled=True', "flows=['t2i', 'i2i']", 'lora.rank.image=2', 'lora.rank.text=3',
        'lora.alpha.text=9.0', 'total_steps=3', 'ema.decay=0.5', 'checkpoint.every=1000']


def overrides(base):
    import train_helper
    return train_helper.SHARED + LORA + [f'lora.base={base}']


def _spec(sharding):
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]


def main(out_dir, base, extra):
    logging.basicConfig(level=logging.INFO)
    import jax
    import numpy as np
    from vd_jax.checkpoint import flatten
    from vd_jax.config import load_config
    from vd_jax.train import setup, train
    from vd_jax.train.settings import apply_overrides

    cfg = load_config('train_tiny:test')
    apply_overrides(cfg, overrides(base) + list(extra))
    out = train(cfg, os.path.join(out_dir, 'workdir'))
    state = out['state']
    run = setup(cfg, os.path.join(out_dir, 'workdir2'))
    info = {'devices': jax.device_count(),
            'mesh': {k: int(v) for k, v in dict(state.step.sharding.mesh.shape).items()},
            'history': {str(k): v for k, v in out['history'].items()},
            'base': {p: {'spec': _spec(v.sharding), 'shape': list(v.shape),
                         'shard_shape': list(v.addressable_shards[0].data.shape)}
                     for p, v in flatten(run.lora.base).items()},
            'adapters': {p: _spec(v.sharding) for p, v in flatten(state.params).items()},
            'export': out['export']}
    arrays = {f'params/{p}': np.asarray(v) for p, v in flatten(state.params).items()}
    arrays.update({f'ema/{p}': np.asarray(v) for p, v in flatten(state.ema_params).items()})
    np.savez(os.path.join(out_dir, 'result.npz'), **arrays)
    with open(os.path.join(out_dir, 'result.json'), 'w') as f:
        json.dump(info, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
