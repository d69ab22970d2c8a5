"""How the diffuser is conditioned, as data: one context, or several mixed at one level.

Each class is a frozen (hashable) dataclass holding the diffuser and the modalities; it *is*
the `apply_fn(params, x_t, t, ctx) -> eps` a `vd_jax.diffusion.sampling.Sampler` runs (a
static jit argument: equal conditionings share one compiled program), and `pack` builds the
traced context pytree it reads (batch-leading leaves, so guidance can concatenate the
unconditional and conditional halves).

  Single(diffuser, xtype, ctype)          one flow (VD_v2_0.apply_model)
  AttentionMix(diffuser, xtype, ctypes)   every context layer runs every context,
                                          h = sum_i r_i * layer_i(h, c_i) (`mixed_ratio`)
  LayerMix(diffuser, xtype, ctypes)       each context layer runs one context, drawn with
                                          probabilities r per layer at every model call
                                          (`apply_model_multicontext`, level 'layer')
  ModelMix(diffuser, xtype, ctypes)       whole single-context flows alternate over the steps,
                                          context 0 on a fraction r_0 (the paper's baseline)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ('attention', 'layer', 'model')


def normalized_ratios(ratios, n: int) -> np.ndarray:
    """Mixing ratios (n,) >= 0, not all 0 -> summing to 1 (ValueError naming them otherwise)."""
    r = np.asarray(ratios, np.float32).reshape(-1)
    if r.shape != (n,):
        raise ValueError(f'need {n} mix ratios, got {list(r)}')
    if np.any(r < 0) or r.sum() <= 0:
        raise ValueError(f'mix ratios must be >= 0 and not all 0, got {list(r)}')
    return r / r.sum()


@dataclasses.dataclass(frozen=True)
class Single:
    """One flow: data layers of `xtype`, context layers of `ctype`."""
    diffuser: Any
    xtype: str
    ctype: str
    # guidance passes x once with both halves' contexts; the diffuser repeats it after the
    # first self-attention (`guidance.SHARES_X`, `Diffuser.__call__`'s context groups)
    shares_x_across_contexts = True

    def __call__(self, params, x, t, ctx):
        return self.diffuser.apply({'params': params}, x, t, ctx, self.xtype, self.ctype)

    def pack(self, context, batch: int, **_):
        del batch
        return context


@dataclasses.dataclass(frozen=True)
class AttentionMix:
    """Several contexts mixed inside every context layer with per-sample ratios."""
    diffuser: Any
    xtype: str
    ctypes: Tuple[str, ...]

    def __call__(self, params, x, t, ctx):
        return self.diffuser.apply({'params': params}, x, t, list(ctx['c']), self.ctypes,
                                   ctx['r'], self.xtype, 'attention', method='mix')

    def pack(self, contexts: Sequence, batch: int, *, ratios, **_):
        r = normalized_ratios(ratios, len(self.ctypes))
        return {'c': tuple(contexts), 'r': jnp.tile(jnp.asarray(r), (batch, 1))}


@dataclasses.dataclass(frozen=True)
class LayerMix:
    """Each context layer runs one context, drawn per layer and model call from the
    sample's key and the step's t (the uncond and cond halves of a sample share the draw).

    The original draws from numpy's global RNG, once per layer and step for the whole batch;
    per-sample keys keep samples independent of the batch they are in."""
    diffuser: Any
    xtype: str
    ctypes: Tuple[str, ...]

    @property
    def num_layers(self) -> int:
        # lazy: vd_jax.models.unet pulls in 13 modules (+0.1 s)
        from vd_jax.models.unet import plan_stream  # noqa: PLC0415
        return len(plan_stream(self.diffuser.config.stream(self.xtype)).context)

    def __call__(self, params, x, t, ctx):
        n_ctx, n = self.num_layers, len(self.ctypes)

        def draw(k, tt, r):
            return jax.random.choice(jax.random.fold_in(k, tt), n, (n_ctx,), p=r)
        choice = jax.vmap(draw)(ctx['key'], t, ctx['r'])
        return self.diffuser.apply({'params': params}, x, t, list(ctx['c']), self.ctypes,
                                   ctx['r'], self.xtype, 'layer', layer_choices=choice,
                                   method='mix')

    def pack(self, contexts: Sequence, batch: int, *, ratios, seeds, **_):
        r = normalized_ratios(ratios, len(self.ctypes))
        # raw uint32 (B, 2) keys: batch-leading, so guidance can concatenate them
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 3))(
            jnp.asarray(seeds, jnp.uint32))
        return {'c': tuple(contexts), 'key': keys, 'r': jnp.tile(jnp.asarray(r), (batch, 1))}


@dataclasses.dataclass(frozen=True)
class ModelMix:
    """Whole single-context flows alternate over the steps: context 0 runs on a fraction
    r_0 of the steps, spread evenly (step p runs context 0 iff floor((p+1) r_0) >
    floor(p r_0)); chosen inside the compiled loop from a per-timestep table."""
    diffuser: Any
    xtype: str
    ctypes: Tuple[str, ...]

    def __post_init__(self):
        if len(self.ctypes) != 2:
            raise ValueError('model-level mixing takes exactly two contexts')

    def __call__(self, params, x, t, ctx):
        use_first = ctx['first'][0, t[0]]
        d, p = self.diffuser, {'params': params}
        return jax.lax.cond(use_first,
                            lambda: d.apply(p, x, t, ctx['c'][0], self.xtype, self.ctypes[0]),
                            lambda: d.apply(p, x, t, ctx['c'][1], self.xtype, self.ctypes[1]))

    def pack(self, contexts: Sequence, batch: int, *, ratios, plan, **_):
        r = normalized_ratios(ratios, 2)
        table = np.zeros(plan.num_timesteps + 1, bool)
        for p, t in enumerate(plan.timesteps):
            table[t] = math.floor((p + 1) * r[0]) > math.floor(p * r[0])
        return {'c': tuple(contexts), 'first': jnp.tile(jnp.asarray(table), (batch, 1))}


def mixing(level: str, diffuser, xtype: str, ctypes: Sequence[str]):
    """The conditioning of a mixing `level` ('attention' | 'layer' | 'model')."""
    classes = {'attention': AttentionMix, 'layer': LayerMix, 'model': ModelMix}
    if level not in classes:
        raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
    return classes[level](diffuser, xtype, tuple(ctypes))
