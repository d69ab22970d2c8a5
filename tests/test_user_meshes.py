"""Meshes a user builds by hand, with any subset of the axes data / fsdp / model in any order
(`jax.sharding.Mesh(devices, ('data',))` is the first one anybody writes): the logical-axis
rules resolve against the axes the mesh has (`vd_jax.sharding.rules_for_mesh`), in sampling
and in training, and give the results of one device.

The 8-device runs happen in a subprocess (`tests/user_mesh_helper.py`, started first) while
this process computes the 1-device references.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import train_helper
import user_mesh_helper as helper
from conftest import child_xla_flags
from vd_jax import sharding as shd
from vd_jax.checkpoint import flatten
from vd_jax.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..')
# As tests/test_mesh_sampling.py: images in [0, 1], float32 sums in another order.
SAMPLE_TOL = 2e-5


def _mesh(names, sizes):
    return AbstractMesh(tuple(sizes), tuple(names))


def test_rules_resolve_against_the_axes_the_mesh_has():
    rules = shd.DEFAULT_RULES
    one = shd.rules_for_mesh(rules, _mesh(('data',), (8,)))
    assert dict(one)['batch'] == 'data' and dict(one)['embed'] is None
    assert dict(one)['mlp'] is None and dict(one)['norm'] is None
    assert shd.batch_spec(one, 2) == P('data', None)
    # the user's order does not matter; the rule's order (data, then fsdp) is kept
    two = shd.rules_for_mesh(rules, _mesh(('fsdp', 'data'), (4, 2)))
    assert dict(two)['batch'] == ('data', 'fsdp') and dict(two)['embed'] == 'fsdp'
    assert dict(two)['mlp'] is None
    assert dict(shd.rules_for_mesh(rules, _mesh(('fsdp',), (8,))))['batch'] == 'fsdp'
    # the full mesh: the rules unchanged (the default stays bit for bit), idempotent
    full = _mesh(shd.MESH_AXES, (2, 2, 2))
    assert shd.rules_for_mesh(rules, full) == rules
    assert shd.rules_for_mesh(one, _mesh(('data',), (8,))) == one
    # a logical name whose every rule lost its axes falls back to replication, after any
    # rule that survives
    alt = shd.rules_for_mesh([('embed', 'fsdp'), ('embed', 'model')], _mesh(('model',), (8,)))
    assert alt == (('embed', 'model'),)
    assert shd.rules_for_mesh([('embed', 'fsdp')], _mesh(('model',), (8,))) == (('embed', None),)


def test_unknown_mesh_axes_are_refused_unless_size_one(caplog):
    with pytest.raises(ConfigError, match=r"mesh axes \{'dp': 8\} are not vd_jax mesh axes"):
        shd.rules_for_mesh(shd.DEFAULT_RULES, _mesh(('dp',), (8,)))
    with pytest.raises(ConfigError, match=r"\{'tensor': 2\}"):
        shd.batch_shards(_mesh(('data', 'tensor'), (4, 2)), shd.DEFAULT_RULES)
    spare = shd.rules_for_mesh(shd.DEFAULT_RULES, _mesh(('data', 'spare'), (8, 1)))
    assert dict(spare)['batch'] == 'data'
    # an axis vd_jax knows but the rules never name: replicated along it, said once
    with caplog.at_level('WARNING', logger='vd_jax.sharding'):
        r = shd.rules_for_mesh([('batch', 'data')], _mesh(('data', 'model'), (4, 2)))
    assert r == (('batch', 'data'),) and "['model'] are used by no logical-axis rule" in caplog.text
    assert shd.batch_shards(_mesh(('data', 'model'), (4, 2)), [('batch', 'data')]) == 4


@pytest.mark.slow
def test_one_axis_mesh_of_one_device_samples_like_no_mesh():
    from jax.sharding import Mesh
    from vd_jax.pipeline import VersatileDiffusion
    vd = VersatileDiffusion.random('tiny', seed=0)
    ref = vd.text_to_image('a cat', steps=2, seed=3)
    for names in (('data',), ('fsdp',), ('model', 'data')):
        devices = np.asarray(jax.devices()[:1]).reshape((1,) * len(names))
        on_mesh = VersatileDiffusion(vd.config, vd.params, mesh=Mesh(devices, names))
        np.testing.assert_array_equal(on_mesh.text_to_image('a cat', steps=2, seed=3), ref)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp('user_meshes')
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
               JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'user_mesh_helper.py'), str(out)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_user_meshes_sample_and_train_like_one_device(eight_devices, tmp_path):
    from vd_jax.pipeline import VersatileDiffusion
    proc, out = eight_devices
    ref = helper.sample(VersatileDiffusion.random('tiny', seed=0))  # while the child works
    ref_train = helper.train_two_steps(str(tmp_path / 'one'))
    log, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, log[-4000:]
    info = json.loads((out / 'result.json').read_text())
    got = dict(np.load(out / 'outputs.npz'))
    assert info['devices'] == 8
    for name, (names, sizes) in helper.SAMPLE_MESHES.items():
        s = info['sample'][name]
        assert list(s['mesh']) == list(names) and list(s['mesh'].values()) == list(sizes)
        if name in helper.T2I_MESHES:
            np.testing.assert_allclose(got[f'sample/{name}'], ref['t2i'], atol=SAMPLE_TOL,
                                       rtol=0, err_msg=name)
        if name in helper.I2T_MESHES:
            assert s['i2t'] == ref['i2t'], name
    assert np.abs(ref['t2i']).max() > 0.05  # not a degenerate (all-black) comparison
    # the batch is split over the data axes the mesh has; parameters over fsdp / model
    shards = {n: s['data_shards'] for n, s in info['sample'].items()}
    assert shards == {'data': 8, 'fsdp': 8, 'fsdp_data': 8, 'model_data': 4,
                      'fsdp_model_data': 4, 'data_unused1': 8}
    specs = {n: s['kernel_spec'] for n, s in info['sample'].items()}
    assert specs['data'] == [] and specs['model_data'] == [None, 'model']
    assert specs['fsdp'] == specs['fsdp_data'] == ['fsdp']
    assert specs['fsdp_model_data'] == ['fsdp', 'model']
    # bad meshes: refused with the axis named
    assert "{'dp': 8}" in info['bad']['dp'] and "{'tensor': 2}" in info['bad']['data_tensor']

    # training: the same losses and parameters as one device, tolerances of
    # tests/test_sharding.py (2 AdamW steps: a ~0 gradient's sign can flip an entry by lr)
    params = flatten(jax.device_get(ref_train['state'].params))
    for name in helper.TRAIN_MESHES:
        t = info['train'][name]
        for step in (1, 2):
            for k, v in ref_train['history'][step].items():
                np.testing.assert_allclose(t['history'][str(step)][k], v,
                                           rtol=train_helper.history_rtol(k),
                                           err_msg=f'{name} {k}')
        diffs = []
        for path, v in params.items():
            np.testing.assert_allclose(got[f'train/{name}/{path}'], np.asarray(v), atol=4e-3,
                                       rtol=0, err_msg=f'{name} {path}')
            diffs.append(np.abs(np.asarray(v) - got[f'train/{name}/{path}']).ravel())
        assert np.quantile(np.concatenate(diffs), 0.999) < 1e-5, name
    assert info['train']['data']['kernel_spec'] == []
    assert info['train']['fsdp_data_model1']['kernel_spec'] == ['fsdp', 'model']
