"""Parameter trees without a training run: shapes, exact initialisation, quick random weights.

`abstract_params` traces a module's init under `jax.eval_shape` (no allocation) and is how
full-size models are checked. `init_params` runs the modules' own initialisers under `jit`
(what training from scratch uses; on CPU its XLA compile is slow, ~tens of seconds for
the tiny model, mostly the per-parameter threefry RNG). `random_params` fills the abstract
tree from numpy in milliseconds with PyTorch-like fan-in scaling and *no* zero-init layers,
so outputs are non-trivial: what tests and untrained smoke runs use.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn


def abstract_params(module: nn.Module, *args, method: Optional[Callable] = None, **kwargs):
    """ShapeDtypeStructs of `module.init(key, *args, method=method)['params']`, unboxed."""
    v = jax.eval_shape(lambda k: module.init(k, *args, method=method, **kwargs),
                       jax.random.PRNGKey(0))
    return nn.unbox(v['params'])


def init_params(module: nn.Module, key, *args, method: Optional[Callable] = None, **kwargs):
    """The modules' own initialisers (zero-init output layers included), jitted."""
    init = jax.jit(lambda k: module.init(k, *args, method=method, **kwargs))
    return nn.unbox(init(key)['params'])


def random_params(abstract: Any, seed: int = 0, dtype=np.float32):
    """Random weights for every leaf of an abstract tree, from numpy (no compile).

    kernels/weights ~ U(+-1/sqrt(fan_in)) over all but the last axis; biases ~ U(+-0.1);
    norm scales ~ 1 + U(+-0.1); embedding tables ~ N(0, 0.02).
    """
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = str(getattr(path[-1], 'key', path[-1]))
        shape = tuple(a.shape)
        if name == 'scale':
            v = 1 + rng.uniform(-0.1, 0.1, shape)
        elif name == 'embedding' or 'embedding' in name:
            v = rng.normal(0, 0.02, shape)
        elif len(shape) <= 1:
            v = rng.uniform(-0.1, 0.1, shape)
        else:
            bound = 1 / np.sqrt(max(int(np.prod(shape[:-1])), 1))
            v = rng.uniform(-bound, bound, shape)
        return jnp.asarray(v.astype(dtype))
    return jax.tree_util.tree_map_with_path(leaf, abstract)
