"""Quiet, honest output: the library messages that mislead a user (`MISLEADING_MESSAGES` in
vd_jax.platform) never reach the command lines' output, and progress bars write no escape codes
into a log. Each test also runs a control that shows the message is real in this environment."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')

# The default install has no PyTorch: hide the one the test extra installed (no import system
# finder sees it, so transformers' availability check fails as it does without torch).
NO_TORCH = textwrap.dedent('''
    import importlib.machinery, sys

    class _NoTorch(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == 'torch' or name.startswith('torch.'):
                return None
            return super().find_spec(name, path, target)

    sys.meta_path = [_NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
''')


def python(code, *, cwd=ROOT, timeout=600):
    r = subprocess.run([sys.executable, '-c', code], cwd=cwd, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, r.stderr


@pytest.mark.slow
def test_without_pytorch_transformers_does_not_announce_missing_models():
    _, err = python(NO_TORCH + 'import transformers')  # control: the message is real
    assert 'PyTorch was not found' in err
    _, err = python(NO_TORCH + 'from vd_jax.platform import quiet_libraries\n'
                    'quiet_libraries()\nimport transformers\n'
                    'from transformers.utils import is_torch_available\n'
                    'assert not is_torch_available()')
    assert 'PyTorch was not found' not in err, err


@pytest.mark.slow
def test_sample_py_without_pytorch_says_nothing_about_it(tmp_path):
    # the real sample.py, without torch, through a text flow (transformers' tokenizers)
    out, err = python(NO_TORCH + textwrap.dedent(f'''
        import runpy
        sys.argv = ['sample.py', '--model', 'tiny', '--task', 't2t', '--prompt', 'a cat',
                    '--steps', '1', '--n', '1', '--no-compile-cache', '--out', {str(tmp_path)!r}]
        try:
            runpy.run_path('sample.py', run_name='__main__')
        except SystemExit as e:
            assert e.code == 0, e.code
        assert 'torch' not in sys.modules
    '''))
    assert 'wrote ' in out and 'PyTorch was not found' not in err, err
    assert '\r' not in err and '\x1b' not in err


@pytest.mark.slow
def test_datasets_build_and_read_without_chatter(tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photos / f'{i}.png')
        (photos / f'{i}.txt').write_text(f'caption {i}')
    read_a_record = textwrap.dedent(f'''
        import tensorflow_datasets as tfds
        tfds.features.Image(shape=(None, None, 3)).decode_example_np(
            open({str(photos / '0.png')!r}, 'rb').read())
    ''')
    _, err = python(read_a_record)  # control: tfds' advice is printed without quiet_libraries
    assert 'OpenCV is not installed' in err
    _, err = python(textwrap.dedent(f'''
        from vd_jax.platform import quiet_libraries
        quiet_libraries()
        from vd_jax.data import Filters, build_image_text
        from vd_jax.data.shapes import build_shapes
        b = build_image_text({str(photos)!r}, {str(tmp_path / 'data')!r}, filters=Filters.none())
        assert len(b.as_data_source()['train'][0]['image'].shape) == 3   # decodes an image
        s = build_shapes({str(tmp_path / 'data')!r}, num_train=4, num_heldout=4)
        assert s.as_data_source()['heldout'][0]['image'].shape == (64, 64, 3)
    ''') + read_a_record)
    for noise in ('OpenCV', 'Downloading and preparing', 'downloaded and prepared',
                  'Using custom data configuration', 'Variant folder', 'dataset_info', '\r',
                  '\x1b'):
        assert noise not in err, (noise, err[-3000:])


def test_line_progress_writes_whole_lines(capsys):
    from vd_jax.outputs import LineProgress, progress_bar
    bar = progress_bar('t2i')
    assert isinstance(bar, LineProgress)  # pytest's stderr is not a terminal
    with bar:
        bar.reset(total=4)
        bar.set_description('t2i batch 1/2')
        bar.update(2)
        bar.set_description('t2i batch 2/2')
        bar.update(2)
    err = capsys.readouterr().err
    assert err == err.strip('\n') + '\n' and '\r' not in err
    assert err.splitlines()[-1].startswith('t2i batch 2/2: 4/4 steps (100%), ')
