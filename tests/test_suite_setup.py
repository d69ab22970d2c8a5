"""The test session's own set-up (tests/conftest.py): the tests compile with LLVM at -O1
without its expensive passes, in this process and in the processes they start, unless
`VD_JAX_TEST_OPTIMIZE=1`; and what they compute does not depend on it."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import OPTIMIZE_AS_USERS, TEST_XLA_FLAGS

# one tiny UNet forward, saved to argv[1]; prints the child's optimisation flags ('-': none)
FORWARD = """
import os, sys, numpy as np, jax, jax.numpy as jnp
print(' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'optimization_level' in f
               or 'expensive' in f) or '-')
from vd_jax.config import load_config
from vd_jax.models.init import abstract_params, random_params
from vd_jax.models.unet import Diffuser
model = Diffuser(load_config('tiny').model.diffuser)
params = random_params(abstract_params(model), seed=0)
x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
c = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 32))
y = jax.jit(lambda p: model.apply({'params': p}, x, jnp.array([3, 700]), c, 'image', 'text'))(params)
np.save(sys.argv[1], np.asarray(y))
"""


def _child(out, env=None):
    return subprocess.run([sys.executable, '-c', FORWARD, str(out)], capture_output=True,
                          text=True, check=True, env=env).stdout.strip()


@pytest.mark.slow  # two child processes (15 s)
def test_tests_compile_at_o1_and_compute_what_users_get(tmp_path):
    flags = os.environ.get('XLA_FLAGS', '').split()
    assert all((f in flags) is not OPTIMIZE_AS_USERS for f in TEST_XLA_FLAGS), flags
    inherited = _child(tmp_path / 'test.npy')
    assert inherited == ('-' if OPTIMIZE_AS_USERS else ' '.join(TEST_XLA_FLAGS))
    # as users compile (sample.py / train.py: only vd_jax.platform's flags)
    user = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    assert _child(tmp_path / 'user.npy', env=user) == '-'
    a, b = np.load(tmp_path / 'test.npy'), np.load(tmp_path / 'user.npy')
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
