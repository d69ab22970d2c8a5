"""Parameter trees without a training run: shapes, exact initialisation, quick random weights.

Works on any model family (`vd_jax.models.FAMILIES`): every module has `init_all(batch)`,
which touches all of its parameters. `abstract_params` traces it under `jax.eval_shape` (no
allocation) and is how full-size models are checked. `init_params` runs the modules' own
initialisers under `jit` (what training from scratch uses). `random_params` fills an abstract
tree from numpy in milliseconds with PyTorch-like fan-in scaling and *no* zero-init layers,
so outputs are non-trivial: what tests and untrained smoke runs use.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn


def abstract_params(module: nn.Module, *args, method=None, boxed: bool = False, **kwargs):
    """ShapeDtypeStructs of a module's parameters, without allocating (`jax.eval_shape`).

    Without arguments the whole model (`init_all(1)`); otherwise `module.init(key, *args,
    method=method, **kwargs)`. boxed: keep flax's logical-axis boxes (what the sharding
    resolver reads)."""
    if not args and method is None and not kwargs:
        args, method = (1,), 'init_all'
    v = jax.eval_shape(lambda k: module.init(k, *args, method=method, **kwargs),
                       jax.random.PRNGKey(0))
    return v['params'] if boxed else nn.unbox(v['params'])


def init_params(module: nn.Module, key, *args, method=None, **kwargs):
    """The modules' own initialisers (zero-init output layers included), jitted.

    Without arguments the whole model (`init_all(1)`); otherwise `module.init(key, *args,
    method=method, **kwargs)` (a single block, say)."""
    if not args and method is None and not kwargs:
        args, method = (1,), 'init_all'
    init = jax.jit(lambda k: module.init(k, *args, method=method, **kwargs))
    return nn.unbox(init(key)['params'])


def param_count(tree_or_module) -> int:
    """Number of parameters of a param tree, or of a module (via `abstract_params`)."""
    tree = abstract_params(tree_or_module) if isinstance(tree_or_module, nn.Module) else tree_or_module
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


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
