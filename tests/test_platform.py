"""vd_jax.platform.configure_xla: the CPU flags sample.py/train.py apply before JAX starts."""
import os
import subprocess
import sys

import pytest

from vd_jax import platform


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv('VD_JAX_KEEP_XLA_FLAGS', raising=False)
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    return monkeypatch


def test_adds_the_flag_once_and_keeps_the_users_flags(env):
    env.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
    first = platform.configure_xla()
    assert first == '--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type='
    assert platform.configure_xla() == first == os.environ['XLA_FLAGS']


def test_a_users_own_value_and_the_opt_out_win(env):
    env.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=+dot')
    assert platform.configure_xla() == '--xla_cpu_experimental_ynn_fusion_type=+dot'
    env.setenv('XLA_FLAGS', '')
    env.setenv('VD_JAX_KEEP_XLA_FLAGS', '1')
    assert platform.configure_xla() == '' and os.environ['XLA_FLAGS'] == ''


def test_an_unmeasured_jaxlib_gets_no_flag(env):
    # XLA aborts on flags it does not know: never add an experimental one to another version
    env.setattr(platform, '_jaxlib_version', lambda: '0.11.0')
    assert platform.configure_xla() == '' and 'XLA_FLAGS' not in os.environ


@pytest.mark.slow
def test_this_jaxlib_starts_with_the_flag():
    code = ('from vd_jax.platform import configure_xla; f = configure_xla(); import jax, jax.numpy as jnp; '
            'x = jax.lax.conv_general_dilated(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), '
            "'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')); print(f, float(x.sum()))")
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'VD_JAX_KEEP_XLA_FLAGS')}
    out = subprocess.run([sys.executable, '-c', code], env=dict(env, JAX_PLATFORMS='cpu'),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, total = out.stdout.split()
    # all-ones 3x3 conv, 4 -> 4 channels, SAME: 36 interior pixels see 9 taps x 4 channels,
    # 24 edge pixels 6 taps, 4 corners 4 taps; times 4 output channels
    assert flags == '--xla_cpu_experimental_ynn_fusion_type='
    assert float(total) == 4 * (36 * 36 + 24 * 24 + 4 * 16)


def test_bfloat16_on_cpu_says_so_once_before_loading_and_in_the_help():
    """bfloat16 compute on a CPU backend: one warning line when the model is made (before any
    weights load: `from_checkpoint` builds the model first), naming the measured slowdown;
    none for float32. sample.py's --help carries the same numbers."""
    import warnings
    import jax
    from vd_jax.config import load_config
    from vd_jax.pipeline import VersatileDiffusion
    from vd_jax.sample_cli import build_parser
    assert jax.default_backend() == 'cpu'
    cfg = load_config('tiny')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        VersatileDiffusion(cfg, {}, dtype='float32')
        VersatileDiffusion(cfg, {}, dtype='bfloat16')
    notices = [w for w in seen if issubclass(w.category, UserWarning)
               and 'bfloat16' in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in seen]
    text = str(notices[0].message)
    assert notices[0].category.__name__ == 'CpuBfloat16Warning'
    assert '\n' not in text and 'slower than float32' in text
    assert 'i2t 0.29 -> 3.19 s' in text and 't2i 5.20 -> 7.91 s' in text
    assert 'i2t 0.29 -> 3.19 s' in ' '.join(build_parser().format_help().split())


@pytest.mark.slow
def test_training_commands_print_info_lines_after_orbax_set_up_logging():
    """Importing the training package (orbax logs through absl, which gives the root logger a
    WARNING handler) must not swallow the progress lines: the stage runner printed none."""
    code = ('import logging, vd_jax.train\n'
            'assert logging.root.handlers, "the import no longer configures logging"\n'
            'from vd_jax.platform import configure_logging\n'
            'configure_logging()\n'
            'logging.getLogger("vd_jax.train").info("step 7/9 | progress")\n'
            'logging.getLogger("orbax").info("orbax chatter")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert 'I step 7/9 | progress' in out.stderr
    assert 'orbax chatter' not in out.stderr
