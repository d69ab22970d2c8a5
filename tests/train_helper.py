"""Run a short training in a separate process and dump what the sharding tests compare.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_helper.py OUT_DIR \
      mesh.data=4 mesh.fsdp=2 total_steps=2 ...

writes OUT_DIR/result.npz (final params and EMA, gathered, flat '/'-paths; process 0) and
OUT_DIR/result.json (per-step metrics, the sharding of every parameter and Adam moment, and
the resolution of the full-size four-flow model on a 1x8 FSDP mesh). Also importable: `SHARED`
holds the overrides every real-model test uses, so one process compiles one train step.
"""
import json
import logging
import os
import sys

# The settings every real-model test shares (tests/test_trainer.py, test_sharding.py,
# test_distributed.py): equal settings -> one compiled train step per process and mesh.
SHARED = ['noise.fixed=True', 'optimizer.warmup_steps=0', 'optimizer.lr=1e-3',
          'log_every=1000', 'tensorboard=False']
CONFIG = 'train_tiny:test'

# How close a sharded run's logged metrics come to one device's (relative): float sums run in
# another order over the shards. The gradient norm sums every squared gradient, and on the
# 2-process run the FSDP-sharded frozen encoders' last bits reach it through Adam: measured
# 5e-5 (tests/test_distributed.py, step 3) and 2.2e-5 on 8 devices with the tests' -O1
# programs (test_sharding.py, test_user_meshes.py).
HISTORY_RTOL = {'grad_norm': 1e-4}


def history_rtol(key: str) -> float:
    """The relative tolerance for the logged metric `key` of a sharded run (HISTORY_RTOL)."""
    return HISTORY_RTOL.get(key, 2e-5)


def image_only_model(model_cfg):
    """A model config with only the image stream (a VD-basic of the same size)."""
    small = model_cfg.copy_and_resolve_references()
    small.diffuser.streams = {'image': dict(model_cfg.diffuser.streams.image)}
    return small


def write_image_only_source(path, seed):
    """An init source for CONFIG's diffuser: a checkpoint of its image stream alone, random
    weights drawn with `seed`."""
    import jax
    import numpy as np
    from vd_jax.checkpoint import write_checkpoint
    from vd_jax.config import load_config
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser
    model = image_only_model(load_config(CONFIG).model)
    params = jax.tree.map(np.asarray, random_params(abstract_params(Diffuser(model.diffuser)),
                                                    seed=seed))
    write_checkpoint(str(path), model, {'diffuser': params})


def _spec(sharding):
    return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]


def main(out_dir, overrides):
    logging.basicConfig(level=logging.INFO)
    import jax
    import numpy as np
    import flax.linen as nn
    from vd_jax import sharding as shd
    from vd_jax.checkpoint import flatten
    from vd_jax.config import load_config
    from vd_jax.train.settings import StepConfig, apply_overrides
    from vd_jax.train import gather, make_model, train
    from vd_jax.train.step import abstract_boxed_params

    cfg = load_config(CONFIG)
    apply_overrides(cfg, SHARED + list(overrides))
    out = train(cfg, os.path.join(out_dir, 'workdir'))
    state = out['state']
    info = {'devices': jax.device_count(), 'processes': jax.process_count(),
            'mesh': {k: int(v) for k, v in dict(out['state'].step.sharding.mesh.shape).items()},
            'history': {str(k): v for k, v in out['history'].items()}, 'params': {}, 'mu': {}}
    for path, leaf in flatten(state.params).items():
        info['params'][path] = {'shape': list(leaf.shape), 'spec': _spec(leaf.sharding),
                                'shard_shape': list(leaf.addressable_shards[0].data.shape)}
    adam = state.opt_state[-2][0]  # chain(clip, adamw(..), multipliers): adamw's ScaleByAdamState
    for path, leaf in flatten(adam.mu).items():
        info['mu'][path] = {'spec': _spec(leaf.sharding),
                            'shard_shape': list(leaf.addressable_shards[0].data.shape)}

    # The full-size four-flow diffuser on a 1 x N FSDP mesh: shapes only (eval_shape).
    full = load_config('train_vd_four_flow')
    fsdp = shd.create_mesh({'data': 1, 'fsdp': -1, 'model': 1})
    with jax.set_mesh(fsdp):
        boxed = abstract_boxed_params(StepConfig.from_config(full, make_model(full)))
    shardings = flatten(shd.logical_shardings(boxed, fsdp, full.logical_axis_rules))
    abstract = flatten(nn.unbox(boxed))
    total = per_device = 0
    for path, a in abstract.items():
        n = int(np.prod(a.shape))
        total += n
        per_device += int(np.prod(shardings[path].shard_shape(a.shape)))
    info['full'] = {'params': total, 'per_device': per_device,
                    'specs': {p: _spec(shardings[p]) for p in (
                        'image/data_blocks_0/conv/kernel',
                        'image/data_blocks_1/in_layers_2/kernel',
                        'text/data_blocks_14/in_layers_2/kernel',
                        'image/context_blocks_0/transformer_blocks_0/attn2/to_k/kernel',
                        'image/data_blocks_1/in_layers_0/scale')}}

    params, ema = gather(state.params), gather(state.ema_params)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, 'result.npz'),
                 **{f'params/{k}': v for k, v in flatten(params).items()},
                 **{f'ema/{k}': v for k, v in flatten(ema).items()})
        with open(os.path.join(out_dir, 'result.json'), 'w') as f:
            json.dump(info, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:])
