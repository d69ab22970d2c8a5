"""Sampling on a device mesh and across processes gives the samples of one device.

* 1 vs 8 devices: a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, read
  once when jax starts) runs every task kind of `tests/mesh_sampling_helper.py` on a
  data x FSDP = 2 x 4 mesh (batches of 1..3 x n split 8 ways, i.e. padded and trimmed; every
  part's parameters sharded 4 ways) and text->image on data = 8 (parameters replicated); this
  process computes the same calls on one device meanwhile.
* 2 processes: `sample.py --distributed` on localhost (2 CPU devices each, CPU collectives
  over gloo as train.py) against a single-process `sample.py` with the same per-process mesh:
  the union of the run folder's files equals the single-process run's.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mesh_sampling_helper as helper
from conftest import child_xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..')
# The sharded programs run other batch sizes per device (8 batch shards: 1 row instead of 3,
# and the encoders / decoders too) and XLA partitions the FSDP matmuls: float32 sums in another
# order. Images in [0, 1] agree to 2e-5; measured max 3.5e-6 (i2t2i), 2.9e-6 (t2i), 2.1-3.0e-6
# (dual, multi, disentangle), 8.6e-7 (i2i with fidelity), 3.2e-6 (t2i on data = 8).
TOL = 2e-5


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp('mesh')
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'mesh_sampling_helper.py'),
                             str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()


@pytest.mark.slow
def test_every_task_on_eight_devices_equals_one_device(eight_devices):
    from vd_jax.pipeline import VersatileDiffusion
    proc, out = eight_devices
    ref = helper.run_cases(VersatileDiffusion.random('tiny', seed=0))  # while the child works
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    with open(out / 'result.json') as f:
        info = json.load(f)
    got = dict(np.load(out / 'outputs.npz'))
    assert info['devices'] == 8
    assert info['mesh'] == {'data': 2, 'fsdp': 4, 'model': 1}
    assert info['mesh8'] == {'data': 8, 'fsdp': 1, 'model': 1}
    for name in helper.CASES:
        r = ref[name]
        if name == 'i2t2i':
            assert info['texts'][name] == r[0], name
            r = r[1]
        if isinstance(r, list):
            assert len(r) == len(info['texts'][name]) and info['texts'][name] == r, name
            continue
        assert got[name].shape == r.shape, name
        np.testing.assert_allclose(got[name], r, atol=TOL, rtol=0, err_msg=name)
        assert np.abs(r).max() > 0.05, name  # not a degenerate (all-black) comparison
    np.testing.assert_allclose(got['t2i_data8'], ref['t2i'], atol=TOL, rtol=0)
    # the batch sizes really did not divide the 8 shards (3, 3, 3, 2, 2, ...): padded + trimmed
    assert got['t2i'].shape[0] == 3 and got['multi'].shape[0] == 2

    # FSDP = 4: every part has parameters split 4 ways (input features of dense kernels, input
    # channels of convs, embedding rows stay whole: 'vocab' is on the model axis)
    p = info['params']
    assert sorted(p) == ['ctx_image', 'ctx_text', 'diffuser', 'vae_image', 'vae_text']
    for part, leaves in p.items():
        sharded = [k for k, v in leaves.items() if v['shard_shape'] != v['shape']]
        assert len(sharded) > len(leaves) // 4, (part, len(sharded), len(leaves))
        for k in sharded:
            v = leaves[k]
            assert v['spec'][0] == 'fsdp' or 'fsdp' in v['spec'], (part, k, v)
            assert np.prod(v['shard_shape']) * 4 == np.prod(v['shape']), (part, k, v)
    dense = p['diffuser']['text/data_blocks_1/in_layers_2/kernel']
    assert dense['spec'] == ['fsdp', 'model'] and dense['shard_shape'][0] * 4 == dense['shape'][0]
    conv = p['diffuser']['image/data_blocks_1/in_layers_2/kernel']
    assert conv['spec'] == [None, None, 'fsdp', 'model']
    assert conv['shard_shape'][2] * 4 == conv['shape'][2]
    # data = 8: every parameter replicated
    for part, leaves in info['params8'].items():
        assert all(v['shard_shape'] == v['shape'] for v in leaves.values()), part
    # the diffuser's activation constraints resolve against the mesh under on_mesh(): the
    # batch goes over (data, fsdp)
    assert info['constraints'] and all("('data', 'fsdp')" in c for c in info['constraints'])


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _listing(run):
    return sorted(os.listdir(run))


def _pixels(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert('RGB'))


def _sample_py(args, out, devices=2):
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(devices), JAX_PLATFORMS='cpu')
    return [sys.executable, os.path.join(ROOT, 'sample.py'), '--model', 'tiny', '--steps', '2',
            '--out', str(out), '--mesh', 'data=2', *args], env


def _run_pair_and_reference(args, tmp_path, name):
    """sample.py twice --distributed (2 processes) and once alone, all at once."""
    port = _free_port()
    cmd, env = _sample_py(args, tmp_path / f'{name}_dist')
    dist = ['--distributed', '--coordinator', f'localhost:{port}', '--num_processes', '2']
    procs = [subprocess.Popen(cmd + dist + ['--process_id', str(i)], cwd=ROOT, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    cmd1, env1 = _sample_py(args, tmp_path / f'{name}_one')
    try:
        one = subprocess.run(cmd1, cwd=ROOT, env=env1, capture_output=True, text=True,
                             timeout=900)
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0, one.stderr[-3000:]
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f'process {i}:\n{log[-3000:]}'
        assert f'process {i}/2' in log, log[-2000:]
    return tmp_path / f'{name}_dist' / 'run-001', tmp_path / f'{name}_one' / 'run-001', logs


def _numbered(run):
    return [f for f in _listing(run) if f.endswith('.png') and f[0].isdigit()]


@pytest.mark.slow
def test_two_processes_write_one_run_like_one_process(tmp_path):
    # 2 prompts x 3 = 6 images, --batch-size 2: 3 samples per process, each in batches of 2
    # and 1 (padded to 2: the one-process batch shape, so the pixels are bit-equal); previews
    # every step are named by batch, numbered over both processes
    args = ['--prompt', 'a cat', '--prompt', 'a dog', '--n', '3', '--batch-size', '2',
            '--preview-every', '1']
    dist, one, logs = _run_pair_and_reference(args, tmp_path, 't2i')
    assert 'process 1: wrote 3 output(s)' in logs[1]
    assert 't2i batch 2/4:' in logs[0] and 't2i batch 4/4:' in logs[1]
    previews = [f for f in _listing(dist) if f.startswith('preview_')]
    assert [f for f in _listing(dist) if f not in previews] == \
        [f for f in _listing(one) if not f.startswith('preview_')]
    assert previews == [f'preview_batch{b:03d}_step_{s:03d}.png' for b in range(1, 5)
                        for s in (1, 2)]
    assert _numbered(one) == [f'{i:04d}.png' for i in range(6)]
    for f in _numbered(one) + ['grid.png']:  # the same programs on the same mesh: bit-equal
        np.testing.assert_array_equal(_pixels(dist / f), _pixels(one / f), err_msg=f)
    s_dist = json.loads((dist / 'settings.json').read_text())
    s_one = json.loads((one / 'settings.json').read_text())
    assert s_dist['processes'] == 2 and s_dist['mesh'] == {'data': 2, 'fsdp': 1, 'model': 1}
    names = {k: sorted(os.path.basename(p) for p in (v if isinstance(v, list) else [v]) if p)
             for k, v in s_dist['outputs'].items()}
    assert names == dict({k: sorted(os.path.basename(p)
                                    for p in (v if isinstance(v, list) else [v]) if p)
                          for k, v in s_one['outputs'].items()}, previews=previews)
    assert len(names['images']) == 6

    # sentences: 3 prompts x 1, --batch-size 2: process 0 sample 0 (padded to 2 rows),
    # process 1 samples 1-2; the previews after the last step decode like the outputs (same
    # seeds)
    args = ['--task', 't2t', '--prompt', 'a cat', '--prompt', 'a dog', '--prompt', 'a bird',
            '--n', '1', '--batch-size', '2', '--preview-every', '2']
    dist, one, _ = _run_pair_and_reference(args, tmp_path, 't2t')
    previews = ['preview_batch001_step_002.txt', 'preview_batch002_step_002.txt']
    assert _listing(dist) == _listing(one) == \
        previews + ['settings.json', 'texts.json', 'texts.txt']
    texts = json.loads((one / 'texts.json').read_text())
    assert json.loads((dist / 'texts.json').read_text()) == texts and len(texts) == 3
    assert (dist / 'texts.txt').read_text() == (one / 'texts.txt').read_text()
    shown = [line for f in previews for line in (dist / f).read_text().splitlines()]
    assert len(shown) == 4  # batch 1 is padded to 2 rows (its second row: sample 1's seed)
    assert [shown[0]] + shown[2:] == [t['text'] for t in texts]


@pytest.mark.slow
def test_two_processes_share_fewer_samples_than_one_batch(tmp_path):
    # 4 prompts, n = 1, the default --batch-size 8: one batch of 4 in one process; split, each
    # process samples 2 (before: process 1 all 4, process 0 none)
    prompts = tmp_path / 'four_prompts.txt'
    prompts.write_text('a cat\na dog\na bird\na fish\n')
    dist, one, logs = _run_pair_and_reference(['--prompts', str(prompts), '--n', '1'],
                                              tmp_path, 'four')
    assert 't2i batch 1/2:' in logs[0] and 't2i batch 2/2:' in logs[1]
    assert 'process 1: wrote 2 output(s)' in logs[1]
    assert _listing(dist) == _listing(one) == \
        ['0000.png', '0001.png', '0002.png', '0003.png', 'grid.png', 'settings.json']
    labels = [json.loads((r / 'settings.json').read_text())['outputs'] for r in (dist, one)]
    assert [os.path.basename(p) for p in labels[0]['images']] == \
        [os.path.basename(p) for p in labels[1]['images']]
    # batches of 2 instead of 4: XLA:CPU sums some float32 products in another order for
    # the other batch shape (measured: images differ by at most 3.7e-6 in [0, 1]), so a PNG
    # value can round to the neighbouring level: measured 2 of 12,288 values, by 1
    for f in _numbered(one) + ['grid.png']:
        a, b = _pixels(dist / f).astype(int), _pixels(one / f).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, f
