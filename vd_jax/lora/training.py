"""Training LoRA adapters with train.py: only the adapters learn, the base is frozen.

A training config with `lora.enabled=True` (configs/train_lora_vd_mini.py) runs the usual
loop (`vd_jax.train.loop`: data, frozen encoders, flows, CFG dropout, checkpoints, resume,
metrics) with three differences, all made here:

  state    `TrainState.params` / `ema_params` / the optimizer moments are the adapters' tree
           ({.. module: {lora_down, lora_up}}: a few thousand numbers), replicated; the
           parameter groups (`grad_multipliers`) are those of the modules they adapt;
  base     the frozen diffuser is read from `lora.base` (a vd_jax checkpoint folder; default
           the shipped VD-mini) straight into the shardings the diffuser's logical axes give
           on the mesh (`sharding` rules, FSDP included), once; the jitted step takes it as an
           argument (never donated, never updated, not checkpointed);
  export   the EMA adapters as one safetensors file `export/step_<N>/<lora.name>.safetensors`
           whose metadata records the ranks, alphas, targets, base and training settings.

Inside the step the objective's diffuser is `vd_jax.lora.apply.TrainableLora` bound to the
base, so the gradient is taken with respect to the adapters only.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict

import jax
import numpy as np
import flax.linen as nn

from vd_jax import sharding as shd
from vd_jax.checkpoint import load_part, read_config
from vd_jax.diffusion.schedule import ScheduleConfig
from vd_jax.errors import ConfigError
from vd_jax.lora.adapters import (Adapter, LoraSpec, check_save_dtype, init_tree, merge,
                                  sampling_weights, save_adapter, select_targets)
from vd_jax.lora.apply import TrainableLora
from vd_jax.train.objectives import Diffusion
from vd_jax.train.optim import group_tree
from vd_jax.train.step import (abstract_boxed_params, create_train_state, state_shardings,
                               train_step)

logger = logging.getLogger('vd_jax.lora')


def enabled(cfg) -> bool:
    """Whether a training config trains LoRA adapters (`lora.enabled`)."""
    return bool((cfg.get('lora', None) or {}).get('enabled', False))


def base_checkpoint(cfg) -> str:
    """`lora.base`, or the shipped VD-mini when empty."""
    path = str(cfg.lora.get('base', '') or '')
    if path:
        return path
    from vd_jax.pipeline import DEFAULT_MODEL, MODELS
    return MODELS[DEFAULT_MODEL]


def adopt_base_schedule(cfg) -> None:
    """Train adapters on the objective their base was trained with: `cfg.model.schedule`
    becomes the schedule recorded in `lora.base`'s config.json (its keys; the rest VD's
    defaults, `ScheduleConfig`). A v-prediction, zero-terminal-SNR base (VD-mini v3) trained
    with an eps loss would learn adapters that fight it. No-op unless `lora.enabled`."""
    if not enabled(cfg):
        return
    base = ScheduleConfig.coerce(read_config(base_checkpoint(cfg)).get('schedule', None))
    ours = ScheduleConfig.coerce(cfg.model.get('schedule', None))
    if base != ours:
        logger.info("model.schedule = %s (lora.base '%s' was trained with it)",
                    base.to_dict(), base_checkpoint(cfg))
        cfg.model.schedule.update(base.to_dict())


class _Lowerable:
    """`step_fn.jitted` for `vd_jax.train.observe.step_flops`: lower(state, batch, sc)."""

    def __init__(self, jitted, base):
        self._jitted, self._base = jitted, base

    def lower(self, state, batch, sc):
        return self._jitted.lower(state, self._base, batch, sc)


def _bound(sc, base):
    obj = sc.objective
    return dataclasses.replace(sc, objective=dataclasses.replace(obj, model=obj.model.bind(base)))


def lora_train_step(state, base, batch, sc):
    """`vd_jax.train.step.train_step` over the adapters, the frozen `base` bound in."""
    return train_step(state, batch, _bound(sc, base))


@dataclasses.dataclass
class LoraRun:
    """The LoRA pieces of a run (`vd_jax.train.loop.Run.lora`)."""
    cfg: Any
    spec: LoraSpec
    sc: Any                  # StepConfig whose objective runs TrainableLora
    mesh: Any
    base: Any                # the frozen diffuser params, placed in their shardings
    base_path: str
    targets: Dict[str, Any]
    boxed: Any               # abstract adapter tree (unboxed: replicated)
    abstract: Any            # TrainState of ShapeDtypeStructs with shardings
    shardings: Any           # TrainState of NamedShardings

    @classmethod
    def create(cls, cfg, sc, mesh) -> 'LoraRun':
        if not isinstance(sc.objective, Diffusion):
            raise ConfigError(f"lora.enabled trains adapters of the diffuser: objective must be "
                              f"'diffusion', got {cfg.get('objective')!r}")
        spec = LoraSpec.from_config(cfg.lora)
        check_save_dtype(cfg.lora.get('save_dtype', 'float32'))
        base_path = base_checkpoint(cfg)
        read_config(base_path)  # a missing / wrong folder fails before any tracing
        with jax.set_mesh(mesh):
            base_boxed = abstract_boxed_params(sc, 1)
        base_abs = nn.unbox(base_boxed)
        base_sh = shd.logical_shardings(base_boxed, mesh, sc.rules)
        base = load_part(base_path, 'diffuser', dtype=np.float32, shardings=base_sh,
                         expected=base_abs)
        targets = select_targets(base_abs, spec)
        streams = sorted({k.split('/')[0] for k in targets})
        model = TrainableLora(sc.objective.model, tuple((s, spec.alpha(s)) for s in streams))
        tree = init_tree(targets, spec, 0)
        # grad_multipliers of the groups the adapters live in (train configs list every group)
        present = set(jax.tree_util.tree_leaves(group_tree(tree, sc.objective.group_of)))
        optim = dataclasses.replace(sc.optim, multipliers=tuple(
            (g, m) for g, m in sc.optim.multipliers if g in present))
        lsc = dataclasses.replace(sc, optim=optim,
                                  objective=dataclasses.replace(sc.objective, model=model))
        boxed = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)
        with jax.set_mesh(mesh):
            abstract, state_sh = state_shardings(lsc, mesh, boxed)
        n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tree))
        logger.info('LoRA: %d adapted kernels in %s, %s adapter parameters; frozen base %s',
                    len(targets), streams, f'{n:,}', base_path)
        return cls(cfg, spec, lsc, mesh, base, base_path, targets, boxed, abstract, state_sh)

    def step_fn(self, batch_sh):
        """step(state, batch) -> (state, metrics), jitted with the base as an argument."""
        repl = shd.replicated(self.mesh)
        base_sh = jax.tree_util.tree_map(lambda a: a.sharding, self.base)
        jitted = jax.jit(lora_train_step, static_argnums=3,
                         in_shardings=(self.shardings, base_sh, batch_sh),
                         out_shardings=(self.shardings, repl), donate_argnums=0)

        def step(state, batch):
            with jax.set_mesh(self.mesh):
                return jitted(state, self.base, batch, self.sc)
        step.jitted = _Lowerable(jitted, self.base)
        return step

    def initial_state(self):
        """Fresh adapters (down random from `seed`, up zero: the base model), zero moments."""
        tree = init_tree(self.targets, self.spec, int(self.cfg.seed))
        placed = jax.tree_util.tree_map(lambda v, s: shd.put_global(v, s), tree,
                                        self.shardings.params)
        return create_train_state(placed, self.sc, self.shardings)

    def merged(self, adapters):
        """The base with `adapters` (a training tree) merged at scale 1 (validation)."""
        a = self.adapter(jax.tree_util.tree_map(np.asarray, jax.device_get(adapters)))
        return jax.jit(merge)(self.base, [sampling_weights(a)], np.ones((1,), np.float32))

    def adapter(self, tree, step: int = 0) -> Adapter:
        cfg = self.cfg
        info = {'base': os.path.abspath(self.base_path) if os.path.isdir(self.base_path)
                else self.base_path, 'model': str(cfg.model.get('name', '')),
                'targets': list(self.spec.targets), 'flows': [f.name for f in self.sc.flows],
                'steps': int(step), 'lr': float(cfg.optimizer.lr),
                'batch_size': int(cfg.batch_size), 'name': self.name,
                'description': str(cfg.lora.get('description', '') or '')}
        return Adapter.from_tree(tree, self.spec, info)

    @property
    def name(self) -> str:
        return str(self.cfg.lora.get('name', '') or 'lora')

    def export(self, ema_adapters, out: str, step: int) -> str:
        """Write the EMA adapters to `<out>/<name>.safetensors` (process 0); returns the path."""
        tree = shd.gather(ema_adapters)
        path = os.path.join(out, f'{self.name}.safetensors')
        if jax.process_index() == 0:
            a = self.adapter(tree, step)
            save_adapter(path, a, str(self.cfg.lora.get('save_dtype', 'float32')))
            logger.info('exported the EMA adapters of step %d to %s (%.3f MB)', step, path,
                        os.path.getsize(path) / 1e6)
        return path
