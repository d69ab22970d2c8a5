"""Meshes, logical-axis resolution, and the same train step on 1 device vs 8 devices.

The 8-device run happens in a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`
must be set before jax starts) running `tests/train_helper.py` on a data x FSDP = 4 x 2 mesh;
it is started first and runs while this process computes the 1-device reference (with the
settings of tests/test_trainer.py, so in one pytest session that program is compiled once).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vd_jax import sharding as shd
from vd_jax.checkpoint import flatten
from vd_jax.config import load_config
from vd_jax.errors import ConfigError
from vd_jax.train.settings import apply_overrides
from vd_jax.train import train

import train_helper
from conftest import child_xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = ['total_steps=2', 'data.num_records=16']


def test_mesh_shapes_and_errors():
    assert shd.mesh_shape({'data': -1}, 8) == {'data': 8, 'fsdp': 1, 'model': 1}
    assert shd.mesh_shape({'data': 4, 'fsdp': -1}, 8) == {'data': 4, 'fsdp': 2, 'model': 1}
    with pytest.raises(ConfigError, match='multiply to the device count'):
        shd.mesh_shape({'data': 3, 'fsdp': 1}, 8)
    with pytest.raises(ConfigError, match='at most one mesh axis may be -1'):
        shd.mesh_shape({'data': -1, 'fsdp': -1}, 8)
    with pytest.raises(ConfigError, match="unknown mesh axes \\['tensor'\\]"):
        shd.mesh_shape({'tensor': 2}, 8)
    mesh = shd.create_mesh({'data': -1, 'fsdp': 1, 'model': 1}, jax.devices()[:1])
    assert mesh.axis_names == shd.MESH_AXES and mesh.devices.size == 1


def test_rules_are_validated_and_non_divisible_dims_fall_back_to_replication(caplog):
    rules = shd.normalize_rules([('batch', ['data', 'fsdp']), ('embed', 'fsdp'), ('norm', None)])
    assert rules == (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('norm', None))
    with pytest.raises(ConfigError, match="unknown logical axis 'embd'"):
        shd.normalize_rules([('embd', 'fsdp')])
    with pytest.raises(ConfigError, match="unknown mesh axes \\['fsd'\\]"):
        shd.normalize_rules([('embed', 'fsd')])
    # a fake 4 x 2 mesh (fit_spec only reads axis sizes)
    mesh = jax.sharding.AbstractMesh((4, 2, 1), shd.MESH_AXES)
    assert shd.fit_spec(P(None, None, 'fsdp', 'model'), (3, 3, 4, 8), mesh) == \
        P(None, None, 'fsdp', 'model')
    with caplog.at_level('INFO', logger='vd_jax.sharding'):
        assert shd.fit_spec(P(('data', 'fsdp'), 'fsdp'), (12, 5), mesh, 'x/kernel') == P()
    assert 'replicating x/kernel' in caplog.text and 'dim 1 (size 5)' in caplog.text
    assert shd.batch_spec(shd.DEFAULT_RULES, 4) == P(('data', 'fsdp'), None, None, None)
    # the configs' rules are the module's defaults (one vocabulary, written down twice)
    assert shd.normalize_rules(load_config('train_tiny').logical_axis_rules) == shd.DEFAULT_RULES


def test_global_batch_on_one_device_and_text_is_refused():
    mesh = shd.create_mesh({'data': 1}, jax.devices()[:1])
    out = shd.global_batch({'x': np.ones((4, 3), np.float32)}, mesh, shd.DEFAULT_RULES)
    assert out['x'].shape == (4, 3) and out['x'].sharding.spec == P(('data', 'fsdp'), None)
    with pytest.raises(ConfigError, match="'caption' holds"):
        shd.global_batch({'caption': np.array(['a cat'])}, mesh, shd.DEFAULT_RULES)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp('eight')
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
               JAX_PLATFORMS='cpu', PYTHONPATH=os.path.join(HERE, '..'))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'train_helper.py'), str(out),
                             'mesh.data=4', 'mesh.fsdp=2', *RUN], env=env, cwd=os.path.join(HERE, '..'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_one_device_and_eight_devices_take_the_same_step(eight_devices, tmp_path):
    proc, out = eight_devices
    # the reference, while the subprocess compiles (XLA compiles single-threaded)
    cfg = load_config(train_helper.CONFIG)
    apply_overrides(cfg, train_helper.SHARED + RUN)
    ref = train(cfg, str(tmp_path))
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    with open(os.path.join(out, 'result.json')) as f:
        info = json.load(f)
    res = np.load(os.path.join(out, 'result.npz'))
    assert info['devices'] == 8 and info['mesh'] == {'data': 4, 'fsdp': 2, 'model': 1}
    # Same losses: float sums run in another order over 8 shards, hence a tolerance.
    for step in (1, 2):
        for k, v in ref['history'][step].items():
            np.testing.assert_allclose(info['history'][str(step)][k], v,
                                       rtol=train_helper.history_rtol(k), err_msg=k)
    # Same parameters after two AdamW steps. Adam divides by sqrt(v), so an entry whose
    # gradient is ~0 (sign decided by the last bits of a differently ordered sum) can move by
    # up to lr per step either way: the hard bound is 2 * lr * steps = 4e-3. Measured: median
    # 4e-9, 99.9% quantile 4.5e-6, max 8e-5; require the bulk to agree to 1e-5.
    diffs = []
    for name, tree in (('params', ref['state'].params), ('ema', ref['state'].ema_params)):
        for path, v in flatten(tree).items():
            np.testing.assert_allclose(res[f'{name}/{path}'], np.asarray(v), atol=4e-3, rtol=0,
                                       err_msg=f'{name}/{path}')
            diffs.append(np.abs(np.asarray(v) - res[f'{name}/{path}']).ravel())
    diffs = np.concatenate(diffs)
    assert np.quantile(diffs, 0.999) < 1e-5, np.quantile(diffs, [0.5, 0.999, 1.0])
    # The parameters and Adam moments really are sharded: FSDP halves the input-feature dim
    # of dense / conv kernels on the 2-way fsdp axis; norms stay replicated.
    p = info['params']
    conv = p['image/data_blocks_1/in_layers_2/kernel']
    assert conv['spec'] == [None, None, 'fsdp', 'model'] and conv['shard_shape'] == [3, 3, 16, 32]
    dense = p['text/data_blocks_1/in_layers_2/kernel']
    assert dense['spec'] == ['fsdp', 'model'] and dense['shard_shape'][0] * 2 == dense['shape'][0]
    assert p['image/data_blocks_1/in_layers_0/scale']['spec'] == []
    assert info['mu']['image/data_blocks_1/in_layers_2/kernel']['shard_shape'] == [3, 3, 16, 32]
    sharded = [k for k, v in p.items() if v['shard_shape'] != v['shape']]
    assert len(sharded) > len(p) // 3
    # Full-size four-flow model on 1 x 8 FSDP: 1/8 of the parameters per device, except the
    # few dims 8 does not divide (conv_in's 4 input channels), which fall back to replication.
    full = info['full']
    assert full['params'] == 2_566_318_852
    assert full['per_device'] < full['params'] / 8 * 1.01
    assert full['specs']['image/data_blocks_0/conv/kernel'] == [None, None, None, 'model']
    assert full['specs']['text/data_blocks_14/in_layers_2/kernel'] == ['fsdp', 'model']
    assert full['specs']['image/data_blocks_1/in_layers_0/scale'] == []
