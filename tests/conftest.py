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
