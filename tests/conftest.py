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


# The suite runs on parallel workers (pytest-xdist, `-n auto --dist loadfile`: a test file stays
# on one worker, so its module fixtures are built once). A file is handed out in collection
# order, so the files that run longest start first; otherwise one of them would start last and
# run alone at the end. Measured in a whole-suite run (`--durations`); the rest keep their order.
LONGEST_FIRST = ('test_vd_mini.py', 'test_first_hour_training.py', 'test_lora_training.py',
                 'test_diffusion_ablation.py')


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside a file and among the rest is kept


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
