"""Test session setup: offline, CPU, deterministic; shared tiny-model fixtures."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Most of a tiny-model test's time is XLA compiling its programs, and most of that is LLVM
# optimising every fused kernel. The tests check what the programs compute, so they compile
# with LLVM at -O1 without its expensive passes (XLA's HLO passes all run; the results agree
# with the -O2 programs' to float32 rounding: tests/test_suite_setup.py, a tiny UNet forward
# 9.5e-7 apart at max 1.36). Measured on a 2-core Zen 4 host, alternating the two settings:
# test_pipeline + test_lora + test_sampling_api on two workers 226 / 228 s at -O2, 193 / 194 s
# here (-15%); the whole suite 38.1 and 37.1 min in two runs (it was 39.4 and 45.3 min at
# -O2, other runs). (-O0, jax's `jax_disable_most_optimizations`, runs loops such as the text
# decoder's greedy search many times slower: tests/user_mesh_helper.py took over 400 s
# against 141.)
# Subprocesses inherit XLA_FLAGS; the tests that set it for a child append to it.
# `VD_JAX_TEST_OPTIMIZE=1` compiles as users do.
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=1', '--xla_llvm_disable_expensive_passes=true')
OPTIMIZE_AS_USERS = os.environ.get('VD_JAX_TEST_OPTIMIZE', '') in ('1', 'true')
if not OPTIMIZE_AS_USERS:
    _flags = os.environ.get('XLA_FLAGS', '').split()
    os.environ['XLA_FLAGS'] = ' '.join(_flags + [f for f in TEST_XLA_FLAGS if f not in _flags])

import pytest  # noqa: E402


def child_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child process with `devices` CPU devices: this session's flags kept."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


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


# The suite runs on two or more workers (README: `-n auto --dist loadfile
# --no-loadscope-reorder`): a test file stays on one worker, so its module fixtures (the
# benchmark runs, the 8-device subprocesses, the shipped model) are built once, and files are
# handed out in collection order. The longest ones come first, or one of them starts last and
# runs alone at the end (measured: the stage pipeline started 29 minutes in and ran alone for
# the last 30). The pipeline test comes first in its file: a worker gets its next file when
# fewer than three of its tests are pending, so a file queued behind the pipeline would wait
# for it. Ranked by the `--durations` of a whole-suite run; the rest keep their order.
RUN_FIRST = ('test_vd_mini.py::test_stage_pipeline_learns_from_nothing', 'test_vd_mini.py',
             'test_user_meshes.py', 'test_benchmarks_smoke.py', 'test_first_hour_training.py',
             'test_mesh_sampling.py')


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        for i, key in enumerate(RUN_FIRST):
            if key in (name, f'{name}::{item.name}'):
                return i
        return len(RUN_FIRST)
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
