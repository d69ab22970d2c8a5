"""`setup`: everything a training run is built from (mesh, model, jitted step, shardings, data
loader, frozen encoders), its fresh state, and its global batches."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import modalities as M
from vd_jax import sharding as shd
from vd_jax.checkpoint import flatten, unflatten
from vd_jax.errors import ConfigError
from vd_jax.lora import training as lora_training
from vd_jax.models.init import random_params
from vd_jax.models.unet import Diffuser
from vd_jax.train import init_from, inputs, objectives, validation
from vd_jax.train.settings import StepConfig
from vd_jax.train.step import (TrainState, abstract_boxed_params, batch_shardings,
                               create_train_state, init_params_sharded, jit_train_step,
                               place_params, state_shardings)

logger = logging.getLogger('vd_jax.train')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def make_model(cfg):
    """The diffuser of `cfg.model` with the training dtype / remat settings (None for the
    stage-0 objectives, which build their own networks)."""
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if str(cfg.get('objective', 'diffusion')) != 'diffusion':
        return None
    # Parameters stay float32 (master weights); `dtype` is the compute dtype.
    return Diffuser(cfg.model.diffuser, dtype=DTYPES[cfg.dtype], remat=bool(cfg.remat))


@dataclasses.dataclass
class Run:
    """Everything `setup` builds for a run (tests use the pieces directly)."""
    cfg: Any
    workdir: str
    mesh: Any
    sc: StepConfig
    abstract: TrainState          # ShapeDtypeStructs with shardings (orbax restore target)
    shardings: TrainState
    boxed: Any                    # boxed abstract params (logical axis names)
    step_fn: Callable
    source: Any
    loader: Any
    host_prep: Callable
    batch_sh: Dict[str, Any]
    consts: Dict[str, Any] = dataclasses.field(default_factory=dict)  # replicated batch fields
    # the frozen encoders (exported with the diffuser; they give CFG dropout's unconditional
    # contexts); `encode_records`: they also encode each batch's raw records on device
    frozen: Optional[inputs.FrozenEncoders] = None
    encode_records: bool = False
    lora: Any = None              # `vd_jax.lora.training.LoraRun` when training adapters

    @property
    def flows(self):
        return self.sc.flows


def setup(cfg, workdir: str, data_source=None, mesh=None) -> Run:
    """Build the mesh, model, shardings, jitted step and the data loader of a run."""
    if cfg.get('jax_cache_dir'):
        jax.config.update('jax_compilation_cache_dir', str(cfg.jax_cache_dir))
    validation.check(cfg)
    mesh = mesh if mesh is not None else shd.create_mesh(dict(cfg.mesh))
    inputs.adopt_encoder_scales(cfg)
    lora_training.adopt_base_schedule(cfg)
    model = make_model(cfg)
    sc = StepConfig.from_config(cfg, model)
    # the config's rules name all three mesh axes; a given mesh may have fewer (any order)
    sc = dataclasses.replace(sc, rules=shd.rules_for_mesh(sc.rules, mesh))
    obj = sc.objective
    lora = None
    if lora_training.enabled(cfg):  # only the adapters train (vd_jax.lora.training)
        lora = lora_training.LoraRun.create(cfg, sc, mesh)
        sc, boxed, abstract, state_sh = lora.sc, lora.boxed, lora.abstract, lora.shardings
    else:
        with jax.set_mesh(mesh):
            boxed = abstract_boxed_params(sc, 1)
            abstract, state_sh = state_shardings(sc, mesh, boxed)
    batch_sh = batch_shardings(obj.batch_ndims, mesh, sc.rules)
    step_fn = lora.step_fn(batch_sh) if lora else jit_train_step(sc, state_sh, batch_sh, mesh)
    source = data_source if data_source is not None else inputs.make_source(cfg, workdir, sc.flows)
    loader = inputs.make_data_loader(cfg, source, mesh)
    diffusion = isinstance(obj, objectives.Diffusion)
    encoders, consts = None, {}
    if diffusion and (cfg.data.kind in ('images', 'shapes') or obj.cfg_dropout > 0):
        # frozen encoders: they encode raw records, and give the unconditional contexts the
        # pipeline samples with (random ones for synthetic smoke runs without encoders.ckpt)
        encoders = frozen_encoders(cfg, sc.flows, mesh,
                                   None if cfg.encoders.ckpt else 'random')
        if obj.cfg_dropout > 0:
            conv = str(cfg.cfg_dropout.get('uncond', 'v1.0'))
            if cfg.data.kind == 'synthetic':
                check_context_lengths(cfg, sc.flows, encoders)
            consts = {objectives.uncond_key(f): shd.put_global(np.asarray(u), batch_sh[
                objectives.uncond_key(f)]) for f, u in encoders.uncond_contexts(conv).items()}
    if diffusion:
        prep = inputs.HostPrep.from_config(cfg, sc.flows, encoders.components if encoders else None)
    else:
        prep = inputs.ObjectivePrep(obj, inputs.tokenizer_components(cfg.model))
    return Run(cfg=cfg, workdir=workdir, mesh=mesh, sc=sc, abstract=abstract,
               shardings=state_sh, boxed=boxed, step_fn=step_fn, source=source, loader=loader,
               host_prep=prep, batch_sh=batch_sh, consts=consts, frozen=encoders,
               encode_records=encoders is not None and cfg.data.kind in ('images', 'shapes'),
               lora=lora)


def check_context_lengths(cfg, flows, encoders) -> None:
    """Synthetic contexts must have the real contexts' length for CFG dropout to swap in the
    unconditional ones."""
    for flow in flows:
        real = M.get(flow.ctype).context_length(encoders.components.config)
        given = int(cfg.data.context_len[flow.ctype])
        if given != real:
            raise ConfigError(f'cfg_dropout: {flow.ctype} contexts have {real} tokens (the '
                              f'context encoder) but synthetic data.context_len.{flow.ctype}='
                              f'{given}; set data.context_len.{flow.ctype}={real} or '
                              'cfg_dropout.p=0')


def frozen_encoders(cfg, flows, mesh, ckpt: Optional[str] = None) -> inputs.FrozenEncoders:
    """The frozen encoders of `cfg.encoders` (or `ckpt`) for `flows`, on `mesh`."""
    return inputs.FrozenEncoders(cfg.model, flows, mesh, shd.normalize_rules(cfg.logical_axis_rules),
                                 str(cfg.encoders.ckpt if ckpt is None else ckpt),
                                 bool(cfg.encoders.vae_sample))


def initial_state(run: Run) -> TrainState:
    """A fresh state: `cfg.init.method` ('exact': the modules' initialisers, jitted into their
    shards; 'random': numpy fan-in weights, instant) and the configured init sources. With
    'exact', the leaves the sources provide are not initialised at all (the others get the
    values the whole init would give them)."""
    cfg, sc = run.cfg, run.sc
    if run.lora is not None:
        return run.lora.initial_state()
    params_sh = run.shardings.params
    method = str(cfg.init.method)
    sources = init_from.configured_sources(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    if method == 'exact' and not sources:
        return create_train_state(init_params_sharded(sc, run.mesh, params_sh, key), sc,
                                  run.shardings)
    if method == 'exact':
        # the sources first, over the abstract tree: then only the leaves none of them
        # provides are initialised (the same values as initialising all; far less to compile)
        host, report = init_from.apply_init_sources(run.abstract.params, sources, cfg.model)
        flat = flatten(host)
        fresh = [k for k, v in flat.items() if init_from.is_abstract(v)]
        if fresh:
            flat.update(shd.gather(init_params_sharded(sc, run.mesh, params_sh, key, only=fresh)))
        host = unflatten(flat)
    elif method == 'random':
        host = jax.tree_util.tree_map(
            np.asarray, random_params(nn.unbox(run.boxed), seed=int(cfg.seed)))
        if sources:
            host, report = init_from.apply_init_sources(host, sources, cfg.model)
    else:
        raise ConfigError(f"init.method must be 'exact' or 'random', got {method!r}")
    if sources:
        logger.info(init_from.format_report(report))
        if jax.process_index() == 0:
            os.makedirs(run.workdir, exist_ok=True)
            init_from.write_report(report, os.path.join(run.workdir, 'init_report.json'))
    return create_train_state(place_params(host, params_sh), sc, run.shardings)


def encoder_key(cfg):
    """The key the frozen encoders' draws (VAE posterior samples) fold each step into."""
    return jax.random.PRNGKey(int(cfg.seed) + 1)


def global_batch(run: Run, iterator, step_index: int, enc_key):
    """The next batch of the run's loader, on the mesh, encoded (frozen encoders, with
    `enc_key` folded with the step), with the run's constants (unconditional contexts)."""
    host = run.host_prep(next(iterator))
    batch = shd.global_batch(host, run.mesh, run.sc.rules)
    if run.encode_records:
        batch = run.frozen(batch, jax.random.fold_in(enc_key, step_index))
    return dict(batch, **run.consts)
