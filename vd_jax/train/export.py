"""Export a run's EMA weights as a vd_jax checkpoint folder that `sample.py --ckpt` loads: at
the end of a run, or later from a saved checkpoint (`train.py --export`)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax

from vd_jax import sharding as shd
from vd_jax.checkpoint import flatten, write_checkpoint
from vd_jax.errors import CheckpointError, ConfigError
from vd_jax.train import inputs, objectives
from vd_jax.train.checkpointer import Checkpointer
from vd_jax.train.manifest_paths import relative_to
from vd_jax.train.run import Run, encoder_key, frozen_encoders, global_batch, make_model, setup
from vd_jax.train.settings import StepConfig, parse_flows, to_plain

logger = logging.getLogger('vd_jax.train')


def export_ema(cfg, ema_params, out: str, step: int, overwrite: bool = True,
               encoders: Optional[inputs.FrozenEncoders] = None, objective=None,
               model_cfg=None, run_dir: Optional[str] = None) -> str:
    """Write the EMA weights as a vd_jax checkpoint folder `sample.py --ckpt` loads: the
    objective's parts (the diffuser; or a stage-0 network) plus, for the diffuser, every
    frozen part the trained flows need (the encoders the run trained with, whatever their
    origin: a converted or trained checkpoint, or random weights for smoke runs).
    `model_cfg`: the model config to record (default `cfg.model`). The manifest's
    `frozen_parts_from` is relative to `run_dir` (the run folder; default: `out`'s parent), so
    it names no folder of this machine (`vd_jax.train.manifest_paths`)."""
    if objective is None:
        objective = StepConfig.from_config(cfg, make_model(cfg)).objective
    diffusion = isinstance(objective, objectives.Diffusion)
    flows = parse_flows(cfg) if diffusion else ()
    if diffusion and encoders is None and inputs.frozen_parts(flows):
        ckpt = str(cfg.encoders.get('ckpt', '') or '') or 'random'
        encoders = frozen_encoders(cfg, flows, shd.create_mesh(dict(cfg.mesh)), ckpt)
    parts = objective.export(shd.gather(ema_params))
    frozen = {p: shd.gather(v) for p, v in encoders.params.items()} if encoders else {}
    if jax.process_index() == 0:
        run_dir = run_dir or os.path.dirname(os.path.abspath(out))
        manifest = {'source': 'vd_jax training (EMA weights)', 'step': int(step),
                    'objective': str(cfg.get('objective', 'diffusion')),
                    'ema_decay': float(cfg.ema.decay), 'flows': [f.name for f in flows],
                    'data': str(cfg.data.kind),  # e.g. 'shapes': the demo offers its examples
                    'frozen_parts_from': {p: relative_to(encoders.ckpt, run_dir)
                                          for p in frozen} if frozen else None}
        write_checkpoint(out, model_cfg if model_cfg is not None else cfg.model,
                         {**parts, **frozen}, manifest=manifest, overwrite=overwrite)
        logger.info('exported EMA weights of step %d to %s (parts %s)', step, out,
                    sorted(parts) + sorted(frozen))
    inputs.sync_processes('export')
    return out


def export_run(run: Run, ema_params, batch, out: str, step: int) -> str:
    """Export a run's EMA weights the way a finished run does: its frozen encoders, and for a
    stage-0 VAE the `latent_scale_factor` calibrated on `batch` (1 / std of its latents), so
    that diffusion trained on this export sees unit-variance latents."""
    if run.lora is not None:  # one adapter file
        return run.lora.export(ema_params, out, step)
    model_cfg = run.cfg.model
    objective = run.sc.objective
    scales = {}
    if type(objective).latent_scales is not objectives.Objective.latent_scales:
        scales = objective.latent_scales(shd.gather(ema_params), shd.gather(batch))
    if scales:
        model_cfg = run.cfg.model.copy_and_resolve_references()
        for m, v in scales.items():
            model_cfg.latent_scale_factor[m] = round(v, 6)
        logger.info('latent_scale_factor %s (1 / std of the latents of the last batch)',
                    dict(model_cfg.latent_scale_factor))
    return export_ema(run.cfg, ema_params, out, step, encoders=run.frozen, objective=objective,
                      model_cfg=model_cfg, run_dir=run.workdir)


def check_same_model(cfg, workdir: str) -> None:
    """ConfigError naming every `model.*` key where `cfg` differs from the run's saved
    config.json (e.g. an export without the run's `model.schedule.prediction_type=...`
    override would write the wrong schedule); nothing to compare without a saved config."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = flatten({'model': json.load(f).get('model', {})}, sep='.')
    given = flatten({'model': json.loads(json.dumps(to_plain(cfg.model), default=str))}, sep='.')
    diff = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
    if diff:
        shown = '; '.join(f'{k}: run {saved.get(k)!r}, given {given.get(k)!r}' for k in diff[:6])
        raise ConfigError(f"the model config differs from the run's ({path}): {shown}"
                          f"{' ...' if len(diff) > 6 else ''}; give the run's overrides again")


def export_from_workdir(cfg, workdir: str, out: Optional[str] = None,
                        step: Optional[int] = None) -> str:
    """Export the EMA of a saved checkpoint (the latest by default) without training: the
    same export as at the end of a run (frozen encoders; a VAE's latent scale calibrated on
    the batch that follows the checkpoint). The model config must be the run's own (its
    saved config.json): a differing one is a ConfigError naming the keys, before any work.
    A workdir without checkpoints is a CheckpointError."""
    check_same_model(cfg, workdir)
    run = setup(cfg, workdir)
    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise CheckpointError(f"no checkpoint in '{ckpt.directory}' to export")
    iterator = iter(run.loader)
    state, _ = ckpt.restore(step, run.abstract, iterator)
    ckpt.close()
    batch = global_batch(run, iterator, step, encoder_key(cfg))
    out = out or os.path.join(workdir, 'export', f'step_{step}')
    return export_run(run, state.ema_params, batch, out, step)
