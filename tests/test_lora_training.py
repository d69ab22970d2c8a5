"""Training LoRA adapters with the trainer (vd_jax.lora.training): only the adapters move, the
frozen base stays sharded as the base is, 1 device and an 8-device mesh take the same steps,
the export loads back into the pipeline.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vd_jax.checkpoint import flatten, write_checkpoint
from vd_jax.config import load_config
from vd_jax.errors import CheckpointError, ConfigError
from vd_jax.train.settings import apply_overrides

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lora_train_helper  # noqa: E402
from conftest import child_xla_flags  # noqa: E402


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A random `train_tiny:test` diffuser as a checkpoint folder: the frozen base."""
    from vd_jax.models.init import abstract_params, random_params
    from vd_jax.models.unet import Diffuser
    cfg = load_config('train_tiny:test')
    d = Diffuser(cfg.model.diffuser)
    out = str(tmp_path_factory.mktemp('lora') / 'base')
    write_checkpoint(out, cfg.model, {'diffuser': jax.tree_util.tree_map(
        np.asarray, random_params(abstract_params(d), 0))})
    return out


def _cfg(base, *extra):
    cfg = load_config('train_tiny:test')
    apply_overrides(cfg, lora_train_helper.overrides(base) + list(extra))
    return cfg


@pytest.mark.slow
def test_one_device_and_eight_devices_train_the_same_adapters(base, tmp_path):
    from vd_jax.lora.adapters import read_adapter
    from vd_jax.train import train
    out = tmp_path / 'eight'
    out.mkdir()
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
               JAX_PLATFORMS='cpu', PYTHONPATH=os.path.join(HERE, '..'))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'lora_train_helper.py'), str(out),
                             base, 'mesh.data=4', 'mesh.fsdp=2'], env=env,
                            cwd=os.path.join(HERE, '..'), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ref = train(_cfg(base), str(tmp_path / 'one'))   # while the subprocess compiles
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    with open(out / 'result.json') as f:
        info = json.load(f)
    res = np.load(out / 'result.npz')
    assert info['devices'] == 8 and info['mesh'] == {'data': 4, 'fsdp': 2, 'model': 1}
    for step in (1, 2, 3):
        for k, v in ref['history'][step].items():
            np.testing.assert_allclose(info['history'][str(step)][k], v, rtol=2e-5, err_msg=k)
    # Only the adapters are in the state; after 3 AdamW steps they agree (as the full-model
    # mesh test: entries with ~0 gradient may move by up to lr per step either way, the bulk
    # must agree to 1e-5).
    diffs = []
    for name, tree in (('params', ref['state'].params), ('ema', ref['state'].ema_params)):
        flat = flatten(tree)
        assert all(k.endswith(('lora_down', 'lora_up')) for k in flat)
        assert sorted(f'{name}/{k}' for k in flat) == sorted(k for k in res if k.startswith(name))
        for path, v in flat.items():
            np.testing.assert_allclose(res[f'{name}/{path}'], np.asarray(v), atol=3e-3, rtol=0,
                                       err_msg=f'{name}/{path}')
            diffs.append(np.abs(np.asarray(v) - res[f'{name}/{path}']).ravel())
    diffs = np.concatenate(diffs)
    assert np.quantile(diffs, 0.999) < 1e-5, np.quantile(diffs, [0.5, 0.999, 1.0])
    # the up matrices learned (they start at zero)
    ups = [np.abs(np.asarray(v)).max() for k, v in flatten(ref['state'].params).items()
           if k.endswith('lora_up')]
    assert min(ups) > 0
    # The frozen base is sharded as the base is: FSDP halves the kernels' input dim; the
    # adapters are replicated.
    b = info['base']
    q = b['image/context_blocks_0/transformer_blocks_0/attn1/to_q/kernel']
    assert q['spec'] == ['fsdp', 'model'] and q['shard_shape'][0] * 2 == q['shape'][0]
    conv = b['image/data_blocks_1/in_layers_2/kernel']
    assert conv['spec'] == [None, None, 'fsdp', 'model']
    assert all(s == [] for s in info['adapters'].values())
    # the export is one adapter file with its settings
    a = read_adapter(os.path.join(ref['export'], 'lora.safetensors'))
    assert a.info['rank'] == {'image': [2], 'text': [3]} and a.info['steps'] == 3
    assert a.info['flows'] == ['t2i', 'i2i'] and a.info['base'] == os.path.abspath(base)
    assert {m.split('/')[0] for m in a.weights} == {'image', 'text'}
    assert all(abs(a.factor(m) - (3.0 if m.startswith('text') else 2.0)) < 1e-9 for m in a.weights)
    for m, (_, u) in a.weights.items():
        np.testing.assert_allclose(u, np.asarray(flatten(ref['state'].ema_params)[f'{m}/lora_up']))


@pytest.mark.slow
def test_bad_lora_settings_are_named(base, tmp_path):
    from vd_jax.train import setup
    with pytest.raises(ConfigError, match="'\\*/to_zz/kernel' matches no"):
        setup(_cfg(base, "lora.targets=['*/to_zz/kernel']"), str(tmp_path / 'a'))
    with pytest.raises(CheckpointError, match='does not exist'):
        setup(_cfg(str(tmp_path / 'nothing')), str(tmp_path / 'b'))


def test_adapters_train_on_the_objective_of_their_base(tmp_path):
    """A base trained with v-prediction on a zero-terminal-SNR schedule (VD-mini v3) gives its
    schedule to the adapters' training config; a config without LoRA is left alone."""
    from vd_jax.lora.training import adopt_base_schedule
    cfg = load_config('train_tiny:test')
    model = cfg.model.to_dict()
    model['schedule'] = dict(beta_linear_start=0.00085, beta_linear_end=0.012, timesteps=1000,
                             prediction_type='v_prediction', rescale_zero_terminal_snr=True)
    base = tmp_path / 'v3_base'
    base.mkdir()
    (base / 'config.json').write_text(json.dumps(model))
    plain = load_config('train_tiny:test')
    adopt_base_schedule(plain)          # lora.enabled is False: nothing read, nothing changed
    assert plain.model.schedule.prediction_type == 'epsilon'
    cfg = _cfg(str(base))
    assert cfg.model.schedule.prediction_type == 'epsilon'
    adopt_base_schedule(cfg)
    s = cfg.model.schedule
    assert (s.prediction_type, s.rescale_zero_terminal_snr, s.beta_schedule) == \
        ('v_prediction', True, 'scaled_linear')
    adopt_base_schedule(cfg)            # idempotent
    assert s.prediction_type == 'v_prediction'
