"""LoRA on the fly: the base weights untouched, each adapted layer adds its low-rank path.

`with_adapters(stacks, scales)` intercepts (`flax.linen.intercept_methods`) every `Dense` and
`Conv` call of the diffuser whose module path has an adapter, and adds

    Dense:  sum_k scale_k * (x @ down_k) @ up_k
    Conv:   sum_k scale_k * conv(x, down_k as a (k, k, in, r) kernel, same stride/padding) @ up_k

(`up` already times alpha / r). Nothing in the model changes: without adapters no interceptor
runs, so the default model stays the same program bit for bit.

`LoraDiffuser` wraps a `Diffuser` with the same `apply` signature the samplers and the
training objective call; its params are {'base': diffuser params, 'lora': {'weights': [one
{module: (down, up)} per adapter], 'scales': (K,)}}. It is a frozen dataclass (a static jit
argument): equal wrappers share one compiled program, and scales / adapter values are traced,
so changing a scale never recompiles. `TrainableLora` is the training form: its params are the
adapters' training tree, the frozen base is bound at trace time (`bind`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from vd_jax.checkpoint import flatten
from vd_jax.lora.adapters import DOWN, UP
from vd_jax.models.layers import Conv, Dense


def _low_rank(module, x, down, up):
    """The adapter path of one layer for input x (no scale)."""
    dt = module.dtype
    x = x.astype(dt)
    if isinstance(module, Conv):
        k = module.kernel_size
        kern = down.astype(dt).reshape(k, k, x.shape[-1], down.shape[-1])
        p = module.padding
        h = jax.lax.conv_general_dilated(x, kern, (module.stride, module.stride),
                                         ((p, p), (p, p)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
        h = jnp.dot(x, down.astype(dt))
    return jnp.dot(h, up.astype(dt))


@contextlib.contextmanager
def with_adapters(stacks: Sequence[Mapping[str, Tuple[Any, Any]]], scales):
    """Within this context (at trace time), adapted Dense/Conv layers add their LoRA paths.

    stacks: one {module path: (down, up * alpha / r)} per adapter; scales: (K,) or K scalars.
    """
    by_module: Dict[str, list] = {}
    for k, weights in enumerate(stacks):
        for m, (down, up) in weights.items():
            by_module.setdefault(m, []).append((k, down, up))

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name != '__call__' or not isinstance(context.module, (Dense, Conv)):
            return y
        entries = by_module.get('/'.join(context.module.path))
        if not entries:
            return y
        x = args[0]
        for k, down, up in entries:
            y = y + (scales[k] * _low_rank(context.module, x, down, up)).astype(y.dtype)
        return y

    if not by_module:
        yield
        return
    with nn.intercept_methods(interceptor):
        yield


def tree_to_stack(tree: Mapping, alphas: Mapping[str, float]) -> Dict[str, Tuple[Any, Any]]:
    """A training tree {.. module: {lora_down, lora_up}} -> {module: (down, up * alpha / r)};
    `alphas`: {stream: alpha} (traced arrays stay traced: gradients flow through)."""
    flat = flatten(tree)
    out = {}
    for key in flat:
        if not key.endswith('/' + DOWN):
            continue
        m = key[:-len(DOWN) - 1]
        down, up = flat[key], flat[f'{m}/{UP}']
        out[m] = (down, up * (float(alphas[m.split('/')[0]]) / down.shape[1]))
    return out


@dataclasses.dataclass(frozen=True)
class LoraDiffuser:
    """A `Diffuser` whose `apply` takes {'params': {'base', 'lora'}} and runs the adapters on
    the fly (see the module docstring). `config`, `dtype`, `clone` as the diffuser's."""
    diffuser: Any

    @property
    def config(self):
        return self.diffuser.config

    @property
    def dtype(self):
        return self.diffuser.dtype

    def clone(self, **kw) -> 'LoraDiffuser':
        return LoraDiffuser(self.diffuser.clone(**kw))

    def apply(self, variables, *args, method=None, **kw):
        p = variables['params']
        lora = p['lora']
        with with_adapters(lora['weights'], lora['scales']):
            return self.diffuser.apply({'params': p['base']}, *args, method=method, **kw)


@dataclasses.dataclass(frozen=True)
class TrainableLora:
    """The training form: params = the adapters' training tree; the frozen base params are
    bound inside the traced step (`bind`), never stored here when static (base None)."""
    diffuser: Any
    alphas: Tuple[Tuple[str, float], ...]
    base: Optional[Any] = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def config(self):
        return self.diffuser.config

    @property
    def dtype(self):
        return self.diffuser.dtype

    def bind(self, base) -> 'TrainableLora':
        return dataclasses.replace(self, base=base)

    def apply(self, variables, *args, method=None, **kw):
        if self.base is None:
            raise RuntimeError('TrainableLora.apply needs the base params: bind(base) first')
        stack = tree_to_stack(variables['params'], dict(self.alphas))
        with with_adapters([stack], jnp.ones((1,), jnp.float32)):
            return self.diffuser.apply({'params': self.base}, *args, method=method, **kw)
