"""Test session setup: offline, CPU, deterministic; shared tiny-model fixtures."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_config():
    from vd_jax.config import load_config
    return load_config('tiny')


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a VD model fails the test: usage errors must come before it."""
    from vd_jax.pipeline import VersatileDiffusion

    def boom(*a, **k):
        raise AssertionError('a model was loaded before the usage error')
    for name in ('default', 'from_checkpoint', 'random'):
        monkeypatch.setattr(VersatileDiffusion, name, boom)
