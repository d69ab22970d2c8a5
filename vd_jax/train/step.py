"""The train state and the jitted train step over an objective (`vd_jax.train.objectives`).

One optimizer step of the diffusion objective (as the paper describes VD's training): for
every configured flow f = (xtype, ctype) compute its epsilon-prediction loss L_f on the same
batch (latent of xtype, context of ctype, its own t ~ U{0..T-1} and eps ~ N(0, I)), take its
gradient, accumulate sum_f w_f grad L_f, then apply one update. Optionally the batch is
further split into `microbatches` whose gradients are averaged (a `lax.scan`, so activation
memory is that of one microbatch); every draw is per record, so the result does not depend
on the split.

Randomness is a pure function of (seed, step, flow, record index) (`draw_noise`): a resumed
run draws exactly what an uninterrupted one would, and a batch split over 1 device, 8 devices
or 2 processes sees the same t and eps per example. With `noise.fixed` the step is left out:
each example keeps its (t, eps) for the whole run, which turns overfitting a small set into
plain regression (the overfitting test uses this to get a robust, noise-free criterion).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding

from vd_jax.checkpoint import flatten
from vd_jax import sharding as shd
from vd_jax.train.settings import StepConfig
from vd_jax.train.optim import ema_decay_at, ema_update, lr_schedule, make_optimizer


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and saves).

    step: int32 scalar, optimizer updates done so far.
    params: diffuser parameters (float32 master weights, whatever the compute dtype).
    ema_params: their exponential moving average (what sampling uses).
    opt_state: optax state of `make_optimizer(...)` (the transform itself is rebuilt from
      the config, so it is not stored).
    """
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def step_key(sc: StepConfig, step) -> jax.Array:
    key = jax.random.PRNGKey(sc.seed)
    return key if sc.fixed_noise else jax.random.fold_in(key, step)


def draw_noise(sc: StepConfig, key, batch: Dict[str, jax.Array]):
    """Per flow: (t (B,) int32, eps like the flow's latent) of the diffusion objective.

    Each example's draw comes from fold_in(fold_in(key, flow index), record index), so it
    depends on *which* record it is, not on where the record sits in the batch: results do
    not depend on how the batch is split over processes, devices or microbatches.
    """
    return sc.objective.draw_noise(key, batch)


def _is_const(name: str) -> bool:
    # replicated constants riding along with the batch (e.g. unconditional contexts): not split
    return name.startswith('const/')


def _split_microbatches(x, k: int):
    # (B, ...) -> (k, B/k, ...): microbatch j takes rows j, j+k, j+2k, ... so each batch shard
    # contributes equally to every microbatch and no data moves between devices.
    b = x.shape[0]
    return jnp.moveaxis(x.reshape((b // k, k) + x.shape[1:]), 1, 0)


def loss_and_grads(params, batch: Dict[str, jax.Array], key, sc: StepConfig, step=0):
    """(metrics incl. 'loss' and 'loss/<term>', gradient) for one optimizer step's batch;
    with `sc.microbatches` > 1, the mean over microbatches (a `lax.scan`)."""
    k = sc.microbatches
    obj = sc.objective
    if k == 1:
        return obj.loss_and_grads(params, batch, key, step)
    rows = {n: v for n, v in batch.items() if not _is_const(n)}
    consts = {n: v for n, v in batch.items() if _is_const(n)}
    b = next(iter(rows.values())).shape[0]
    if b % k:
        raise ValueError(f'batch size {b} is not divisible by microbatches={k}')
    mb = jax.tree_util.tree_map(lambda x: _split_microbatches(x, k), rows)

    def body(carry, xs):
        m_acc, grad_acc = carry
        m, grads = obj.loss_and_grads(params, dict(xs, **consts), key, step)
        return (jax.tree_util.tree_map(jnp.add, m_acc, m),
                jax.tree_util.tree_map(jnp.add, grad_acc, grads)), None

    shapes = jax.eval_shape(lambda: obj.loss_and_grads(
        params, dict(jax.tree_util.tree_map(lambda x: x[0], mb), **consts), key, step))
    zero_m, zero_g = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (metrics, grads), _ = jax.lax.scan(body, (zero_m, zero_g), mb)
    scale = 1.0 / k
    return (jax.tree_util.tree_map(lambda v: v * scale, metrics),
            jax.tree_util.tree_map(lambda g: g * jnp.asarray(scale, g.dtype), grads))


def train_step(state: TrainState, batch: Dict[str, jax.Array], sc: StepConfig
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step over all flows. Pure; jit it with `sc` static (see `jit_train_step`).

    Returns the new state and metrics: loss (sum_f w_f L_f), loss/<flow>, grad_norm (before
    clipping and multipliers), param_norm, lr, ema_decay, ok (loss and gradient finite).
    """
    with nn.logical_axis_rules(sc.rules):
        metrics, grads = loss_and_grads(state.params, batch, step_key(sc, state.step), sc,
                                        state.step)
    tx = make_optimizer(sc.optim, state.params, sc.objective.group_of)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(sc.ema_decay, sc.ema_use_num_updates, state.step + 1)
    ema = ema_update(state.ema_params, params, decay)
    total = metrics['loss']
    grad_norm = optax.global_norm(grads)
    metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                   lr=lr_schedule(sc.optim)(state.step), ema_decay=decay,
                   ok=jnp.isfinite(total) & jnp.isfinite(grad_norm))
    return TrainState(state.step + 1, params, ema, opt_state), metrics


# ----------------------------------------------------------------------------------------
# Shapes and shardings
# ----------------------------------------------------------------------------------------

def init_batch_size(mesh: Mesh, rules) -> int:
    """Batch of the init trace: one row per batch shard, so activation constraints divide."""
    return shd.batch_shards(mesh, rules)


def abstract_boxed_params(sc: StepConfig, batch: int = 1):
    """`jax.eval_shape` of the diffuser's init, still boxed with logical axis names."""
    return _abstract_boxed(sc.objective, sc.rules, batch)


@functools.lru_cache(maxsize=8)
def _abstract_boxed(objective, rules, batch):
    # Cached: tracing the full init takes seconds and a process often sets up several runs.
    with nn.logical_axis_rules(rules):
        return jax.eval_shape(lambda k: objective.init(k, batch), jax.random.PRNGKey(0))


def state_shardings(sc: StepConfig, mesh: Mesh, boxed=None) -> Tuple[TrainState, TrainState]:
    """(abstract TrainState with shardings attached, TrainState of NamedShardings).

    Parameters, EMA and the parameter-shaped optimizer moments share the parameters'
    shardings; scalars (step, Adam's count) are replicated.
    """
    boxed = abstract_boxed_params(sc) if boxed is None else boxed
    params_sh = shd.logical_shardings(boxed, mesh, sc.rules)
    params_abs = nn.unbox(boxed)
    tx = make_optimizer(sc.optim, params_abs, sc.objective.group_of)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    repl = shd.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_abs, params_sh, transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = TrainState(step=repl, params=params_sh, ema_params=params_sh, opt_state=opt_sh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abs,
                          ema_params=params_abs, opt_state=opt_abs)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def _new_state(params, sc: StepConfig) -> TrainState:
    tx = make_optimizer(sc.optim, params, sc.objective.group_of)
    ema = jax.tree_util.tree_map(lambda p: p + jnp.zeros((), p.dtype), params)  # a distinct buffer
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params))


def create_train_state(params, sc: StepConfig, shardings: TrainState) -> TrainState:
    """A fresh TrainState around (already placed) params: EMA = params, zero moments."""
    return jax.jit(_new_state, static_argnums=1, out_shardings=shardings)(params, sc)


def _init_params(key, sc: StepConfig, batch: int):
    with nn.logical_axis_rules(sc.rules):
        return nn.unbox(sc.objective.init(key, batch))


def init_params_sharded(sc: StepConfig, mesh: Mesh, params_sh, key,
                        only: Optional[Sequence[str]] = None) -> Any:
    """The modules' own initialisers, run as one jitted program whose outputs are created
    directly in their shards (`jit(init, out_shardings=...)`: no host copy of the model).

    only: '/'-joined parameter paths (`vd_jax.checkpoint.flatten`'s names); then just those
    leaves come back, as a flat {path: array}. The program is the whole init's with the other
    outputs dropped, so XLA removes their initialisers as dead code: the values are bitwise
    the whole init's (tests/test_trainer.py), and a run that takes most of its parameters from
    init sources compiles a fraction of the kernels (VD-mini's dc stage: 182 of 506 leaves,
    27 -> 6 s of compilation on a 2-core Zen 4)."""
    batch = init_batch_size(mesh, sc.rules)
    with jax.set_mesh(mesh):
        if only is None:
            return jax.jit(_init_params, static_argnums=(1, 2), out_shardings=params_sh)(
                key, sc, batch)
        only = tuple(only)
        flat_sh = flatten(params_sh)

        def init_only(k):
            flat = flatten(_init_params(k, sc, batch))
            return {p: flat[p] for p in only}
        return jax.jit(init_only, out_shardings={p: flat_sh[p] for p in only})(key)


def place_params(host_params, params_sh) -> Any:
    """Host (numpy) params, identical on every process -> global arrays in their shards."""
    return jax.tree_util.tree_map(lambda v, s: shd.put_global(np.asarray(v), s),
                                  host_params, params_sh)


def batch_shardings(fields: Dict[str, int], mesh: Mesh, rules) -> Dict[str, NamedSharding]:
    """{field: NamedSharding} for batch fields given as {field: ndim}: split on the batch
    axes, except the replicated constants ('const/...')."""
    return {k: shd.replicated(mesh) if _is_const(k) else shd.batch_sharding(mesh, rules, nd)
            for k, nd in fields.items()}


def jit_train_step(sc: StepConfig, state_sh: TrainState, batch_sh: Dict[str, NamedSharding],
                   mesh: Mesh):
    """`train_step` jitted with in/out NamedShardings and the state donated.

    Returns step(state, batch) -> (state, metrics); call it under `jax.set_mesh(mesh)` (the
    model's activation constraints need the mesh). Equal `sc`/shardings reuse one compiled
    program (jax caches on the function, the static argument and the shardings).
    """
    repl = shd.replicated(mesh)
    jitted = jax.jit(train_step, static_argnums=2, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, repl), donate_argnums=0)

    def step(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch, sc)
    step.jitted = jitted
    return step
