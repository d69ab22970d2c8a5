"""Every task kind on the tiny model, on a device mesh or on one device: what
tests/test_mesh_sampling.py compares.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_sampling_helper.py OUT

runs `CASES` on a data x FSDP = 2 x 4 mesh (batches split 8 ways, every part's parameters
sharded 4 ways, loaded by `from_checkpoint(mesh=...)`) and `text_to_image` again on a
data = 8 mesh (`random(mesh=...)`: parameters replicated), and
writes OUT/outputs.npz (images), OUT/result.json (sentences, the sharding of every parameter,
the activation constraints seen while tracing the diffuser). Importable: `CASES` and
`run_cases` give the 1-device reference in the test process.
"""
import json
import os
import sys

import numpy as np

STEPS = 2
IMG = np.random.default_rng(0).uniform(size=(40, 56, 3)).astype(np.float32)  # non-square
# name -> (method, args, keywords); every batch (3, 2 or 1 x n) leaves 8 shards unfilled
CASES = {
    't2i': ('text_to_image', (['a cat', 'a dog', 'a bird'],), dict(n=1)),
    'i2i_fidelity': ('image_variation', (IMG,), dict(n=3, fidelity=0.5, focus=0.8)),
    'i2t': ('image_to_text', (IMG,), dict(n=3)),
    't2t': ('text_variation', (['a cat', 'a dog'],), dict(n=1)),
    'dual_attention': ('dual_guided', ('a cat', IMG), dict(n=2, mix=0.6)),
    'dual_layer': ('dual_guided', ('a cat', IMG), dict(n=2, mix=0.6, mix_level='layer')),
    'dual_model': ('dual_guided', ('a cat', IMG), dict(n=2, mix=0.6, mix_level='model')),
    'multi': ('multi_context', ([IMG, IMG[::-1]], [1.0, 0.5], 'a cat'), dict(n=2)),
    'disentangle': ('disentangle', (IMG,), dict(n=2, level=1)),
    'i2t2i': ('i2t2i', (IMG, 'a dog', 'a cat'), dict(n=2)),
}


def run_cases(vd, names=None):
    """{name: images (B, H, W, 3) | sentences | (sentences, images)} of `CASES`."""
    out = {}
    for name in names or CASES:
        method, args, kw = CASES[name]
        out[name] = getattr(vd, method)(*args, steps=STEPS, seed=3, **kw)
    return out


def _shards(tree):
    from vd_jax.checkpoint import flatten
    return {p: {'shape': list(v.shape), 'shard_shape': list(v.addressable_shards[0].data.shape),
                'spec': [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec]}
            for p, v in flatten(tree).items()}


def _constraints(vd):
    """The diffuser's activation constraints as traced under `Components.on_mesh()`."""
    import jax
    import jax.numpy as jnp
    comps = vd.components
    d = comps.module('diffuser')
    x, t, c = jnp.zeros((8, 16, 16, 4)), jnp.zeros((8,), jnp.int32), jnp.zeros((8, 77, 32))
    with comps.on_mesh():
        jaxpr = jax.make_jaxpr(lambda p: d.apply({'params': p}, x, t, c, 'image', 'text'))(
            comps.params['diffuser'])
    return [str(e.params['sharding'].spec) for e in jaxpr.jaxpr.eqns
            if e.primitive.name == 'sharding_constraint']


def main(out_dir):
    import jax
    from vd_jax.checkpoint import write_checkpoint
    from vd_jax.pipeline import VersatileDiffusion
    # the reference's weights as a checkpoint, read straight into their shards
    host = VersatileDiffusion.random('tiny', seed=0)
    ckpt = write_checkpoint(os.path.join(out_dir, 'ckpt'), host.config, {
        p: jax.tree_util.tree_map(np.asarray, t) for p, t in host.params.items()})
    vd = VersatileDiffusion.from_checkpoint(ckpt, mesh='data=2,fsdp=4')
    outs = run_cases(vd)
    vd8 = VersatileDiffusion.random('tiny', seed=0, mesh={'data': -1})
    outs['t2i_data8'] = run_cases(vd8, ['t2i'])['t2i']
    arrays, texts = {}, {}
    for name, o in outs.items():
        if name == 'i2t2i':
            texts[name], arrays[name] = o
        elif isinstance(o, list):
            texts[name] = o
        else:
            arrays[name] = o
    info = {'devices': jax.device_count(),
            'mesh': {k: int(v) for k, v in vd.components.mesh.shape.items()},
            'mesh8': {k: int(v) for k, v in vd8.components.mesh.shape.items()},
            'texts': texts,
            'params': {part: _shards(tree) for part, tree in vd.params.items()},
            'params8': {part: _shards(tree) for part, tree in vd8.params.items()},
            'constraints': _constraints(vd)}
    np.savez(os.path.join(out_dir, 'outputs.npz'), **arrays)
    with open(os.path.join(out_dir, 'result.json'), 'w') as f:
        json.dump(info, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1])
