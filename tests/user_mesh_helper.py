"""Sampling and training on meshes a user builds by hand (`jax.sharding.Mesh(devices, names)`
with one, two or three axes, in the user's order): what tests/test_user_meshes.py compares.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/user_mesh_helper.py OUT

writes OUT/outputs.npz (`sample/<mesh>`: text->image and image->text of the tiny model;
`train/<mesh>/<param path>`: parameters after two train steps) and OUT/result.json (per mesh:
its shape, the sharding of a few parameters, the train losses; the errors of bad meshes).
Importable: `SAMPLE_MESHES`, `TRAIN_MESHES`, `sample` and `train_two_steps` give the
1-device reference in the test process.
"""
import json
import os
import sys

import numpy as np

from vd_jax.errors import ConfigError

# name -> (axis names, sizes) over 8 devices
# (one, two and three axes, each in an order other than vd_jax's own; vd_jax's own order is
# what tests/test_mesh_sampling.py and tests/test_sharding.py run)
SAMPLE_MESHES = {
    'data': (('data',), (8,)),
    'fsdp': (('fsdp',), (8,)),
    'fsdp_data': (('fsdp', 'data'), (4, 2)),
    'model_data': (('model', 'data'), (2, 4)),
    'fsdp_model_data': (('fsdp', 'model', 'data'), (2, 2, 2)),
    'data_unused1': (('data', 'spare'), (8, 1)),  # a size-1 axis of another name: ignored
}
# Each mesh compiles its own samplers on 8 devices (the test's cost): text->image runs on a
# mesh of one, two and three axes (each in the user's order); image->text (the other data and
# context layers) on the one-axis and the three-axis mesh. Every mesh's rules (its batch
# split and a kernel's sharding) are checked, sampled or not.
T2I_MESHES = ('data', 'fsdp_data', 'fsdp_model_data')
I2T_MESHES = ('data', 'fsdp_model_data')
# training: three axes in the user's order with model = 1 (training with model > 1 gives
# another grad_norm than one device, 7.83 vs 7.47 at the same loss, on the full mesh too:
# a separate issue, reported, not this one's)
TRAIN_MESHES = ('data', 'fsdp_data_model1')
SAMPLE_MESHES_TRAIN_ONLY = {'fsdp_data_model1': (('fsdp', 'data', 'model'), (4, 2, 1))}
# meshes vd_jax refuses: an axis name it has no rule for, used with more than one device
BAD_MESHES = {'dp': (('dp',), (8,)), 'data_tensor': (('data', 'tensor'), (4, 2))}
IMG = np.random.default_rng(0).uniform(size=(40, 56, 3)).astype(np.float32)
TRAIN_RUN = ['total_steps=2', 'data.num_records=16']


def make_mesh(name, table=SAMPLE_MESHES):
    import jax
    from jax.sharding import Mesh
    names, sizes = table[name]
    return Mesh(np.asarray(jax.devices()[:int(np.prod(sizes))]).reshape(sizes), names)


def sample(vd, flows=('t2i', 'i2t')):
    """{'t2i': images (3, H, W, 3), 'i2t': 3 sentences} on the tiny model (the flows asked)."""
    out = {}
    if 't2i' in flows:
        out['t2i'] = vd.text_to_image(['a cat', 'a dog', 'a bird'], steps=2, seed=3)
    if 'i2t' in flows:
        out['i2t'] = vd.image_to_text(IMG, n=3, steps=2, seed=3)
    return out


def train_two_steps(workdir, mesh=None):
    """Two train steps of tests/train_helper.py's settings on `mesh` (default: the config's)."""
    import train_helper
    from vd_jax.config import load_config
    from vd_jax.train import train
    from vd_jax.train.settings import apply_overrides
    cfg = load_config(train_helper.CONFIG)
    apply_overrides(cfg, train_helper.SHARED + TRAIN_RUN)
    return train(cfg, workdir, mesh=mesh)


def _spec(leaf):
    return [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec]


def main(out_dir):
    import jax
    from vd_jax.checkpoint import flatten
    from vd_jax.pipeline import VersatileDiffusion
    host = VersatileDiffusion.random('tiny', seed=0)
    arrays, info = {}, {'devices': jax.device_count(), 'sample': {}, 'train': {}, 'bad': {}}
    for name in SAMPLE_MESHES:
        mesh = make_mesh(name)
        vd = VersatileDiffusion(host.config, host.params, mesh=mesh)
        out = sample(vd, [f for f, on in (('t2i', T2I_MESHES), ('i2t', I2T_MESHES))
                          if name in on])
        if 't2i' in out:
            arrays[f'sample/{name}'] = out['t2i']
        kernel = vd.params['diffuser']['text']['data_blocks_1']['in_layers_2']['kernel']
        info['sample'][name] = {'mesh': {k: int(v) for k, v in mesh.shape.items()},
                                'i2t': out.get('i2t'), 'kernel_spec': _spec(kernel),
                                'data_shards': vd.components.data_shards}
    for name in TRAIN_MESHES:
        res = train_two_steps(os.path.join(out_dir, f'train_{name}'),
                              make_mesh(name, {**SAMPLE_MESHES, **SAMPLE_MESHES_TRAIN_ONLY}))
        for path, v in flatten(jax.device_get(res['state'].params)).items():
            arrays[f'train/{name}/{path}'] = np.asarray(v)
        info['train'][name] = {'history': {str(k): v for k, v in res['history'].items()},
                               'kernel_spec': _spec(res['state'].params['text']['data_blocks_1']
                                                    ['in_layers_2']['kernel'])}
    for name in BAD_MESHES:
        try:
            VersatileDiffusion(host.config, host.params, mesh=make_mesh(name, BAD_MESHES))
            info['bad'][name] = None
        except ConfigError as e:
            info['bad'][name] = str(e)
    np.savez(os.path.join(out_dir, 'outputs.npz'), **arrays)
    with open(os.path.join(out_dir, 'result.json'), 'w') as f:
        json.dump(info, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1])
