"""`train_and_evaluate`: the training loop with Orbax checkpoints, resume, metrics and export.

  setup        mesh, model, step settings, shardings, data loader, (frozen encoders)
  state        restore the latest checkpoint (train state + EMA + data iterator), or
               initialise (exact / random) and copy parameters from `cfg.init.sources`
  loop         host batch -> global batch -> [encoders] -> jitted step; the next batch is read
               while the device runs; metrics every step to metrics.jsonl; a progress line
               every `log_every` steps; a checkpoint every `checkpoint_every` steps, at the end
               and on SIGTERM; a non-finite loss stops the run before anything is saved
  export       the EMA weights as a vd_jax checkpoint folder (`workdir/export/step_<N>`)

Resuming is exact: the step's randomness is a function of (seed, step), the grain iterator
state is saved with each checkpoint (captured *before* the next batch is prefetched), and the
same program runs on the same inputs, so a resumed run reproduces an uninterrupted one bit for
bit on the same mesh.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding as shd
from vd_jax.train import init_from, inputs
from vd_jax.train.config import ConfigError, StepConfig, to_plain
from vd_jax.train.step import (TrainState, abstract_boxed_params, batch_shardings,
                               create_train_state, init_params_sharded, jit_train_step,
                               place_params, state_shardings)

logger = logging.getLogger('vd_jax.train')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; nothing of that step was saved."""


# ----------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------

def make_model(cfg):
    """The diffuser of `cfg.model` with the training dtype / remat settings."""
    from vd_jax.models.unet import Diffuser  # noqa: PLC0415
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
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
    host_prep: inputs.HostPrep
    encoders: Optional[inputs.Encoders]
    batch_sh: Dict[str, Any]

    @property
    def flows(self):
        return self.sc.flows


def setup(cfg, workdir: str, data_source=None, mesh=None) -> Run:
    """Build the mesh, model, shardings, jitted step and the data loader of a run."""
    if cfg.get('jax_cache_dir'):
        jax.config.update('jax_compilation_cache_dir', str(cfg.jax_cache_dir))
    mesh = mesh if mesh is not None else shd.create_mesh(dict(cfg.mesh))
    model = make_model(cfg)
    sc = StepConfig.from_config(cfg, model)
    with jax.set_mesh(mesh):
        boxed = abstract_boxed_params(sc, 1)
        abstract, state_sh = state_shardings(sc, mesh, boxed)
    fields = inputs.needed_fields(sc.flows)
    ndims = {'index': 1, 'latent_image': 4, 'latent_text': 2, 'context_image': 3, 'context_text': 3}
    batch_sh = batch_shardings({f: ndims[f] for f in fields}, mesh, sc.rules)
    step_fn = jit_train_step(sc, state_sh, batch_sh, mesh)
    source = data_source if data_source is not None else inputs.make_source(cfg, workdir, sc.flows)
    loader = inputs.make_data_loader(cfg, source, mesh)
    encoders = inputs.Encoders(cfg, sc.flows, mesh) if cfg.data.kind == 'images' else None
    return Run(cfg=cfg, workdir=workdir, mesh=mesh, sc=sc, abstract=abstract,
               shardings=state_sh, boxed=boxed, step_fn=step_fn, source=source, loader=loader,
               host_prep=inputs.HostPrep(cfg, sc.flows), encoders=encoders, batch_sh=batch_sh)


def initial_state(run: Run) -> TrainState:
    """A fresh state: `cfg.init.method` ('exact': the modules' initialisers, jitted into their
    shards; 'random': numpy fan-in weights, instant) then the configured init sources."""
    cfg, sc = run.cfg, run.sc
    params_sh = run.shardings.params
    method = str(cfg.init.method)
    sources = init_from.configured_sources(cfg)
    if method == 'exact':
        params = init_params_sharded(sc, run.mesh, params_sh, jax.random.PRNGKey(cfg.seed))
        host = gather(params) if sources else None
    elif method == 'random':
        from vd_jax.models.init import random_params  # noqa: PLC0415
        host = jax.tree_util.tree_map(
            np.asarray, random_params(nn.unbox(run.boxed), seed=int(cfg.seed)))
        params = None
    else:
        raise ConfigError(f"init.method must be 'exact' or 'random', got {method!r}")
    if sources:
        host, report = init_from.apply_init_sources(host, sources, cfg.model)
        logger.info(init_from.format_report(report))
        if jax.process_index() == 0:
            os.makedirs(run.workdir, exist_ok=True)
            init_from.write_report(report, os.path.join(run.workdir, 'init_report.json'))
    if host is not None:
        params = place_params(host, params_sh)
    return create_train_state(params, sc, run.shardings)


def gather(tree) -> Any:
    """Global arrays -> full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

class _IteratorSnapshot:
    """A grain iterator state captured at one moment (what grain's Orbax handler saves)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Orbax `CheckpointManager` over `<workdir>/checkpoints`: items 'state' (TrainState incl.
    EMA), 'data' (grain iterator state, one file per process) and 'meta' (JSON).

    Orbax writes each step into a temporary folder and renames it when complete, so a crash
    mid-save never leaves a partial checkpoint that restore would pick up.
    """

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp  # noqa: PLC0415
        self.ocp = ocp
        self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=bool(async_save))
        self.mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def all_steps(self) -> List[int]:
        return list(self.mngr.all_steps())

    def save(self, step: int, state: TrainState, data_state: bytes, meta: Dict[str, Any]):
        import grain  # noqa: PLC0415
        args = self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
            meta=self.ocp.args.JsonSave(meta))
        self.mngr.save(step, args=args, force=True)

    def restore(self, step: int, abstract: TrainState, iterator=None):
        import grain  # noqa: PLC0415
        items = dict(state=self.ocp.args.StandardRestore(abstract),
                     meta=self.ocp.args.JsonRestore())
        if iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(iterator)
        out = self.mngr.restore(step, args=self.ocp.args.Composite(**items))
        return out['state'], out['meta']

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.close()


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

class MetricWriter:
    """metrics.jsonl in the workdir (one line per step) and TensorBoard if it is installed."""

    def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._f = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._f = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, metrics: Dict[str, float]):
        if not self.enabled:
            return
        self._f.write(json.dumps({'step': int(step), **metrics}) + '\n')
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def flush(self):
        if self._f:
            self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(logdir):
    for mod in ('tensorboardX', 'torch.utils.tensorboard'):
        base = mod.split('.')[0]
        if importlib.util.find_spec(base) is None:
            continue
        if mod.startswith('torch') and importlib.util.find_spec('tensorboard') is None:
            continue
        try:
            return __import__(mod, fromlist=['SummaryWriter']).SummaryWriter(logdir)
        except Exception as e:  # noqa: BLE001 -- optional extra
            logger.info('TensorBoard writer %s unavailable: %s', mod, e)
    logger.info('TensorBoard not installed; metrics go to metrics.jsonl only')
    return None


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def load_metrics(workdir: str) -> Dict[int, Dict[str, float]]:
    """{step: metrics} from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            m = json.loads(line)
            out[m.pop('step')] = m
    return out


# ----------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------

class _Preemption:
    """SIGTERM -> save at the end of the current step and stop (all processes agree)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._old = None
        return self

    def _handler(self, signum, frame):
        del frame
        logger.warning('signal %d received: saving a checkpoint after this step, then stopping',
                       signum)
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils  # noqa: PLC0415
        flags = multihost_utils.process_allgather(np.asarray(self.flag))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def export_ema(cfg, ema_params, out: str, step: int, overwrite: bool = True) -> str:
    """Write the EMA diffuser weights (plus the frozen encoder parts of `encoders.ckpt`, if
    that is a checkpoint folder) as a vd_jax checkpoint folder the samplers load."""
    from vd_jax.checkpoint import (available_parts, load_safetensors, unflatten,  # noqa: PLC0415
                                   write_checkpoint)
    host = gather(ema_params)
    if jax.process_index() == 0:
        parts = {'diffuser': host}
        enc = str(cfg.encoders.get('ckpt', '') or '')
        copied = []
        if enc and enc != 'random' and os.path.isdir(enc):
            for part in available_parts(enc):
                if part != 'diffuser':
                    parts[part] = unflatten(load_safetensors(os.path.join(enc, f'{part}.safetensors')))
                    copied.append(part)
        manifest = {'source': 'vd_jax training (EMA weights)', 'step': int(step),
                    'ema_decay': float(cfg.ema.decay), 'flows': list(cfg.flows),
                    'frozen_parts_from': enc if copied else None}
        write_checkpoint(out, cfg.model, parts, manifest=manifest, overwrite=overwrite)
        logger.info('exported EMA weights of step %d to %s (parts %s)', step, out, sorted(parts))
    inputs._sync('export')
    return out


def export_from_workdir(cfg, workdir: str, out: Optional[str] = None,
                        step: Optional[int] = None) -> str:
    """Export the EMA of a saved checkpoint (the latest by default) without training."""
    run_mesh = shd.create_mesh(dict(cfg.mesh))
    model = make_model(cfg)
    sc = StepConfig.from_config(cfg, model)
    with jax.set_mesh(run_mesh):
        abstract, _ = state_shardings(sc, run_mesh)
    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in '{ckpt.directory}' to export")
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    out = out or os.path.join(workdir, 'export', f'step_{step}')
    return export_ema(cfg, state.ema_params, out, step)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def _host_metrics(m) -> Dict[str, float]:
    return {k: (bool(v) if k == 'ok' else float(v)) for k, v in jax.device_get(m).items()}


def train_and_evaluate(cfg, workdir: str, *, data_source=None,
                       hooks: Sequence[Callable[[int, Dict[str, float]], None]] = (),
                       mesh=None) -> Dict[str, Any]:
    """Train `cfg` in `workdir`, resuming from its latest checkpoint if there is one.

    Args:
      cfg: a training ConfigDict (`configs/train_*.py`).
      workdir: checkpoints/, metrics.jsonl, config.json, init_report.json, export/.
      data_source: a random-access record source used instead of `cfg.data` (tests).
      hooks: called as hook(step, metrics) after every completed step.
      mesh: a ready `Mesh` instead of `cfg.mesh`.
    Returns:
      {'step', 'state' (final TrainState), 'history' ({step: metrics} of this call),
       'status' ('finished' | 'preempted'), 'export' (folder or None), 'steps_per_s'}.
    Raises:
      TrainingDiverged: a step produced a non-finite loss/gradient (not saved).
    """
    t_setup = time.time()
    run = setup(cfg, workdir, data_source=data_source, mesh=mesh)
    total = int(cfg.total_steps)
    is_main = jax.process_index() == 0
    logger.info('%s; flows %s; global batch %d', shd.describe(run.mesh),
                [f[0] for f in run.flows], int(cfg.batch_size))
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(to_plain(cfg), f, indent=1, sort_keys=True, default=str)

    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep),
                        async_save=bool(cfg.checkpoint.async_save))
    iterator = iter(run.loader)
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, run.abstract, iterator)
        logger.info('resumed from step %d (%s)', start, ckpt.directory)
        if int(state.step) != start:
            raise RuntimeError(f'checkpoint {start} holds a state of step {int(state.step)}')
    else:
        start = 0
        state = initial_state(run)
    logger.info('setup took %.1fs', time.time() - t_setup)

    writer = MetricWriter(workdir, is_main, bool(cfg.tensorboard))
    history: Dict[int, Dict[str, float]] = {}
    enc_key = jax.random.PRNGKey(int(cfg.seed) + 1)

    def next_batch(step_index: int):
        host = run.host_prep(next(iterator))
        batch = shd.global_batch(host, run.mesh, run.sc.rules)
        if run.encoders is not None:
            batch = run.encoders(batch, jax.random.fold_in(enc_key, step_index))
        return batch

    def meta(step):
        return {'step': int(step), 'flows': [f[0] for f in run.flows],
                'config': to_plain(cfg), 'time': time.time()}

    step, status, export_dir = start, 'finished', None
    rate_t, rate_n, first_t = None, 0, time.time()
    steps_per_s = float('nan')
    try:
        with _Preemption() as preempt:
            batch = next_batch(step) if step < total else None
            while step < total:
                state, m = run.step_fn(state, batch)
                step += 1
                data_state = iterator.get_state()  # exactly `step` batches consumed
                if step < total:
                    batch = next_batch(step)       # host work overlaps the device step
                hm = _host_metrics(m)
                if not hm['ok']:
                    ckpt.wait()
                    last = ckpt.latest_step()
                    losses = ', '.join(f'{k[5:]}={v:.4g}' for k, v in hm.items()
                                       if k.startswith('loss/'))
                    where = (f'the last good checkpoint is step {last} in {ckpt.directory}'
                             if last is not None else 'no checkpoint had been written yet')
                    raise TrainingDiverged(
                        f"training diverged at step {step}: loss={hm['loss']} ({losses}), "
                        f"grad_norm={hm['grad_norm']}. This step's state was NOT saved; {where}. "
                        'Resume from it with a lower optimizer.lr or grad_clip_norm, or check '
                        'the data of this step.')
                hm.pop('ok')
                history[step] = hm
                writer.write(step, hm)
                for hook in hooks:
                    hook(step, hm)
                now = time.time()
                if rate_t is None:  # the first step includes the compile
                    logger.info('first step (compile + run) took %.1fs', now - first_t)
                    rate_t, rate_n = now, 0
                else:
                    rate_n += 1
                if step % int(cfg.log_every) == 0 or step == total:
                    if rate_n:  # over the steps since the last progress line
                        steps_per_s = rate_n / max(now - rate_t, 1e-9)
                        rate_t, rate_n = now, 0
                    flows = ' '.join(f'{k[5:]} {v:.4f}' for k, v in hm.items()
                                     if k.startswith('loss/'))
                    logger.info('step %d/%d | loss %.4f [%s] | %.2f steps/s %.1f ex/s | lr %.2e '
                                '| grad %.3f | ETA %s', step, total, hm['loss'], flows,
                                steps_per_s, steps_per_s * int(cfg.batch_size), hm['lr'],
                                hm['grad_norm'], _fmt_time((total - step) / steps_per_s)
                                if steps_per_s == steps_per_s and steps_per_s > 0 else '?')
                    writer.flush()
                stop = preempt.requested()
                if stop or step % int(cfg.checkpoint.every) == 0 or step == total:
                    ckpt.save(step, state, data_state, meta(step))
                if stop:
                    status = 'preempted'
                    logger.warning('stopped at step %d after saving (resume with the same '
                                   'command)', step)
                    break
        ckpt.wait()
        if status == 'finished' and bool(cfg.export.at_end) and step == total and total > start:
            export_dir = os.path.join(workdir, 'export', f'step_{step}')
            export_ema(cfg, state.ema_params, export_dir, step)
    finally:
        writer.close()
        ckpt.wait()
        ckpt.close()
    return {'step': step, 'state': state, 'history': history, 'status': status,
            'export': export_dir, 'steps_per_s': steps_per_s}
