"""The train state, the multi-flow loss and the jitted train step.

One optimizer step (as the paper describes VD's training): for every configured flow f =
(xtype, ctype) compute its epsilon-prediction loss L_f on the same batch (latent of xtype,
context of ctype, its own t ~ U{0..T-1} and eps ~ N(0, I)), take its gradient, accumulate
sum_f w_f grad L_f, then apply one update. Optionally the batch is further split into
`microbatches` whose gradients are averaged (a `lax.scan`, so activation memory is that of
one microbatch); t and eps are drawn for the whole batch first, so the result does not
depend on the split.

Randomness is a pure function of (seed, step, flow, record index) (`draw_noise`): a resumed
run draws exactly what an uninterrupted one would, and a batch split over 1 device, 8 devices
or 2 processes sees the same t and eps per example. With `noise.fixed` the step is left out:
each example keeps its (t, eps) for the whole run, which turns overfitting a small set into
plain regression (the overfitting test uses this to get a robust, noise-free criterion).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding

from vd_jax import sharding as shd
from vd_jax.diffusion.schedule import eps_loss, make_schedule
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
    """Per flow: (t (B,) int32, eps like the flow's latent).

    Each example's draw comes from fold_in(fold_in(key, flow index), record index), so it
    depends on *which* record it is, not on where the record sits in the batch: results do
    not depend on how the batch is split over processes, devices or microbatches.
    """
    index = batch['index']
    out = []
    for i, (_, xtype, _, _) in enumerate(sc.flows):
        x0 = batch[f'latent_{xtype}']
        k_flow = jax.random.fold_in(key, i)

        def one(j, k_flow=k_flow, shape=x0.shape[1:]):
            k_t, k_n = jax.random.split(jax.random.fold_in(k_flow, j))
            return (jax.random.randint(k_t, (), 0, sc.schedule[2]),
                    jax.random.normal(k_n, shape, jnp.float32))
        out.append(jax.vmap(one)(index))
    return out


def _flows_loss_grads(params, batch, noise, sc: StepConfig):
    """Per-flow losses and sum_f w_f grad L_f on one (micro)batch."""
    schedule = make_schedule(beta_linear_start=sc.schedule[0], beta_linear_end=sc.schedule[1],
                             timesteps=sc.schedule[2])
    losses, grads = {}, None
    for (name, xtype, ctype, w), (t, eps) in zip(sc.flows, noise):
        x0, ctx = batch[f'latent_{xtype}'], batch[f'context_{ctype}']

        def loss_fn(p, x0=x0, ctx=ctx, t=t, eps=eps, xtype=xtype, ctype=ctype):
            def denoise(x_t, tt):
                return sc.model.apply({'params': p}, x_t, tt, ctx, xtype, ctype)
            return eps_loss(denoise, schedule, x0, jax.random.PRNGKey(0), t=t, noise=eps)[0]

        if w == 0.0:  # logged, not trained
            losses[name] = loss_fn(params)
            continue
        loss, g = jax.value_and_grad(loss_fn)(params)
        losses[name] = loss
        if w != 1.0:
            g = jax.tree_util.tree_map(lambda a: a * jnp.asarray(w, a.dtype), g)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
    if grads is None:
        grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    return losses, grads


def _split_microbatches(x, k: int):
    # (B, ...) -> (k, B/k, ...): microbatch j takes rows j, j+k, j+2k, ... so each batch shard
    # contributes equally to every microbatch and no data moves between devices.
    b = x.shape[0]
    return jnp.moveaxis(x.reshape((b // k, k) + x.shape[1:]), 1, 0)


def loss_and_grads(params, batch: Dict[str, jax.Array], key, sc: StepConfig):
    """({flow: mean loss}, accumulated gradient) for one optimizer step's batch."""
    noise = draw_noise(sc, key, batch)
    k = sc.microbatches
    if k == 1:
        return _flows_loss_grads(params, batch, noise, sc)
    b = next(iter(batch.values())).shape[0]
    if b % k:
        raise ValueError(f'batch size {b} is not divisible by microbatches={k}')
    mb = jax.tree_util.tree_map(lambda x: _split_microbatches(x, k), (batch, noise))

    def body(carry, xs):
        loss_acc, grad_acc = carry
        losses, grads = _flows_loss_grads(params, xs[0], xs[1], sc)
        return (jax.tree_util.tree_map(jnp.add, loss_acc, losses),
                jax.tree_util.tree_map(jnp.add, grad_acc, grads)), None

    zero_l = {f[0]: jnp.zeros((), jnp.float32) for f in sc.flows}
    zero_g = jax.tree_util.tree_map(jnp.zeros_like, params)
    (losses, grads), _ = jax.lax.scan(body, (zero_l, zero_g), mb)
    scale = 1.0 / k
    return ({n: v * scale for n, v in losses.items()},
            jax.tree_util.tree_map(lambda g: g * jnp.asarray(scale, g.dtype), grads))


def train_step(state: TrainState, batch: Dict[str, jax.Array], sc: StepConfig
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step over all flows. Pure; jit it with `sc` static (see `jit_train_step`).

    Returns the new state and metrics: loss (sum_f w_f L_f), loss/<flow>, grad_norm (before
    clipping and multipliers), param_norm, lr, ema_decay, ok (loss and gradient finite).
    """
    with nn.logical_axis_rules(sc.rules):
        losses, grads = loss_and_grads(state.params, batch, step_key(sc, state.step), sc)
    tx = make_optimizer(sc.optim, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(sc.ema_decay, sc.ema_use_num_updates, state.step + 1)
    ema = ema_update(state.ema_params, params, decay)
    total = sum(w * losses[name] for name, _, _, w in sc.flows)
    grad_norm = optax.global_norm(grads)
    metrics = {'loss': total, 'grad_norm': grad_norm, 'param_norm': optax.global_norm(params),
               'lr': lr_schedule(sc.optim)(state.step), 'ema_decay': decay,
               'ok': jnp.isfinite(total) & jnp.isfinite(grad_norm)}
    metrics.update({f'loss/{n}': v for n, v in losses.items()})
    return TrainState(state.step + 1, params, ema, opt_state), metrics


# ----------------------------------------------------------------------------------------
# Shapes and shardings
# ----------------------------------------------------------------------------------------

def init_batch_size(mesh: Mesh, rules) -> int:
    """Batch of the init trace: one row per batch shard, so activation constraints divide."""
    return shd.batch_shards(mesh, rules)


def abstract_boxed_params(sc: StepConfig, batch: int = 1):
    """`jax.eval_shape` of the diffuser's init, still boxed with logical axis names."""
    return _abstract_boxed(sc.model, sc.rules, batch)


@functools.lru_cache(maxsize=8)
def _abstract_boxed(model, rules, batch):
    # Cached: tracing the full init takes seconds and a process often sets up several runs.
    from vd_jax.models.unet import Diffuser
    with nn.logical_axis_rules(rules):
        v = jax.eval_shape(lambda k: model.init(k, batch, method=Diffuser.init_all),
                           jax.random.PRNGKey(0))
    return v['params']


def state_shardings(sc: StepConfig, mesh: Mesh, boxed=None) -> Tuple[TrainState, TrainState]:
    """(abstract TrainState with shardings attached, TrainState of NamedShardings).

    Parameters, EMA and the parameter-shaped optimizer moments share the parameters'
    shardings; scalars (step, Adam's count) are replicated.
    """
    boxed = abstract_boxed_params(sc) if boxed is None else boxed
    params_sh = shd.logical_shardings(boxed, mesh, sc.rules)
    params_abs = nn.unbox(boxed)
    tx = make_optimizer(sc.optim, params_abs)
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
    tx = make_optimizer(sc.optim, params)
    ema = jax.tree_util.tree_map(lambda p: p + jnp.zeros((), p.dtype), params)  # a distinct buffer
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params))


def create_train_state(params, sc: StepConfig, shardings: TrainState) -> TrainState:
    """A fresh TrainState around (already placed) params: EMA = params, zero moments."""
    return jax.jit(_new_state, static_argnums=1, out_shardings=shardings)(params, sc)


def _init_params(key, sc: StepConfig, batch: int):
    from vd_jax.models.unet import Diffuser
    with nn.logical_axis_rules(sc.rules):
        return nn.unbox(sc.model.init(key, batch, method=Diffuser.init_all)['params'])


def init_params_sharded(sc: StepConfig, mesh: Mesh, params_sh, key) -> Any:
    """The modules' own initialisers, run as one jitted program whose outputs are created
    directly in their shards (`jit(init, out_shardings=...)`: no host copy of the model)."""
    with jax.set_mesh(mesh):
        return jax.jit(_init_params, static_argnums=(1, 2), out_shardings=params_sh)(
            key, sc, init_batch_size(mesh, sc.rules))


def place_params(host_params, params_sh) -> Any:
    """Host (numpy) params, identical on every process -> global arrays in their shards."""
    return jax.tree_util.tree_map(lambda v, s: shd.put_global(np.asarray(v), s),
                                  host_params, params_sh)


def batch_shardings(fields: Dict[str, int], mesh: Mesh, rules) -> Dict[str, NamedSharding]:
    """{field: NamedSharding} for batch fields given as {field: ndim}."""
    return {k: shd.batch_sharding(mesh, rules, nd) for k, nd in fields.items()}


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
