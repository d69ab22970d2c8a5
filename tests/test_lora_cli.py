"""LoRA at the command lines and in the demo: sample.py --lora PATH[:SCALE] (repeatable), the
demo's --lora and its per-session scales, the shapes world's extra shape and extended reader.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vd_jax import sample_cli
from vd_jax.errors import CheckpointError, ConfigError
from vd_jax.lora.adapters import Adapter, LoraSpec, init_tree, save_adapter, select_targets
from vd_jax.lora.stack import parse_lora_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def adapter_file(tmp_path_factory):
    """A random adapter (non-zero up) for the tiny config's diffuser."""
    from vd_jax.checkpoint import flatten, unflatten
    from vd_jax.config import load_config
    from vd_jax.models.init import abstract_params
    from vd_jax.models.unet import Diffuser
    d = Diffuser(load_config('tiny').model.diffuser)
    spec = LoraSpec()
    tree = init_tree(select_targets(abstract_params(d), spec), spec, 0)
    rng = np.random.default_rng(3)
    tree = unflatten({k: v if k.endswith('down') else rng.normal(0, 0.2, v.shape).astype(np.float32)
                      for k, v in flatten(tree).items()})
    return save_adapter(str(tmp_path_factory.mktemp('lora') / 'style.safetensors'),
                        Adapter.from_tree(tree, spec))


@pytest.mark.slow
def test_lora_flag_parsing(adapter_file, tmp_path):
    assert parse_lora_flag(adapter_file) == (adapter_file, 1.0)
    assert parse_lora_flag(adapter_file + ':0.25') == (adapter_file, 0.25)
    assert parse_lora_flag(adapter_file + ':-1') == (adapter_file, -1.0)
    with pytest.raises(CheckpointError, match='does not exist'):
        parse_lora_flag(str(tmp_path / 'missing.safetensors') + ':0.5')
    with pytest.raises(ConfigError, match='scale must be finite'):
        parse_lora_flag(adapter_file + ':inf')


def test_sample_py_refuses_a_missing_lora_before_loading(no_model, tmp_path, capsys):
    assert sample_cli.main(['--model', 'tiny', '--prompt', 'x', '--out', str(tmp_path),
                            '--lora', str(tmp_path / 'nope.safetensors')]) == 2
    err = capsys.readouterr().err
    assert "error: --lora: '" in err and 'nope.safetensors' in err


@pytest.mark.slow
def test_sample_py_with_two_loras(adapter_file, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
               XDG_CACHE_HOME=str(tmp_path / 'cache'))
    outs = {}
    for tag, extra in (('base', []), ('lora', ['--lora', adapter_file + ':0.5',
                                                '--lora', adapter_file + ':0.5'])):
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--model', 'tiny',
                            '--prompt', 'a cat', '--n', '1', '--steps', '3',
                            '--out', str(tmp_path / tag)] + extra,
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if tag == 'lora':  # the same file twice needs two names
            assert r.returncode == 2 and "'style' is already loaded" in r.stderr, r.stderr
            r = subprocess.run(r.args[:-4] + ['--lora', adapter_file + ':0.5'], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        run_dir = os.path.join(tmp_path, tag, 'run-001')
        from PIL import Image
        outs[tag] = np.asarray(Image.open(os.path.join(run_dir, '0000.png')))
        settings = json.load(open(os.path.join(run_dir, 'settings.json')))
    assert "LoRA 'style' at scale 0.5" in r.stderr
    assert settings['lora'] == [[adapter_file, 0.5]]
    assert np.abs(outs['lora'].astype(int) - outs['base']).max() > 0


@pytest.mark.slow
def test_demo_takes_loras_and_applies_each_sessions_scales(adapter_file, monkeypatch):
    from vd_jax.demo import lora_panel, model, options
    args = options.parse(['--config', 'tiny', '--lora', adapter_file + ':0.7'])
    assert args.lora == [(adapter_file, 0.7)]
    with pytest.raises(SystemExit):
        options.parse(['--lora', '/no/such.safetensors'])
    vd = model.load_model(None, config='tiny', loras=args.lora)
    served = model.Served(vd, untrained=True)
    assert served.lora_defaults == {'style': 0.7}
    state = {}
    monkeypatch.setattr(lora_panel.st, 'session_state', state)
    assert lora_panel.apply(served) == {'style': 0.7}
    state['lora_scale_style'] = 0.2
    assert lora_panel.apply(served) == {'style': 0.2} and vd.loras == {'style': 0.2}


def test_the_extra_shape_is_drawn_captioned_and_read():
    from vd_jax.data import shapes as W
    from vd_jax.eval.shapes_reader import read_image
    from vd_jax.lora.teach_shape import new_shape_samples
    kinds = W.SHAPES + W.EXTRA_SHAPES
    star = W.Attributes('star', 'red', 'white', 'small', 'top left')
    assert read_image(W.render_any(star), shapes=kinds) == star
    assert read_image(W.render_any(star)).shape in W.SHAPES   # the world's reader: no star
    assert W.caption_any(star, 0) == 'a small red star at the top left on a white background'
    with pytest.raises(ValueError):
        W.render(star)                                        # the world itself is unchanged
    train, held = new_shape_samples('star', 'train', 200), new_shape_samples('star', 'heldout', 43)
    assert not {s.attrs for s in train} & {s.attrs for s in held}
    assert len({s.attrs for s in held}) == 43
    for a in W.ALL_COMBINATIONS[::97]:                        # old shapes still read exactly
        assert read_image(W.render(a), shapes=kinds) == a
    # the diamond too (the square turned 45 degrees), at both sizes
    for size in ('small', 'large'):
        d = W.Attributes('diamond', 'blue', 'black', size, 'right')
        assert read_image(W.render_any(d), shapes=kinds) == d
    assert len({s.attrs for s in new_shape_samples('diamond', 'heldout', 42)}) == 42  # its rule's count
