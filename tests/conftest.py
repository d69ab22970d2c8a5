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


def pytest_report_header(config):
    """The whole suite compiles many hundreds of XLA programs in one process, and XLA:CPU maps
    ~480 memory regions per sampler program: more than the kernel's default vm.max_map_count
    (65530) allows, which shows as "Cannot allocate memory" late in the run. `.ci/run` raises
    it; say so here when it is low."""
    try:
        with open('/proc/sys/vm/max_map_count') as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    if limit < 262144:
        return (f'warning: vm.max_map_count={limit} is too low for the whole suite in one process; '
                'raise it (sudo sysctl -w vm.max_map_count=1048576) or run subsets')
    return None
