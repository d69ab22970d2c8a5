"""`train`: the training loop with Orbax checkpoints, resume, metrics and export.

  setup        mesh, model, step settings, shardings, data loader, (frozen encoders)
  state        restore the latest checkpoint (train state + EMA + data iterator), or
               initialise (exact / random) and copy parameters from `cfg.init.sources`
  loop         host batch -> global batch -> [encoders] -> jitted step; the next batch is read
               while the device runs. Metrics stay on device and are fetched at sync points
               (every `log_every` steps, before each checkpoint, at the end): one line per step
               to metrics.jsonl, a progress line, the NaN check (a non-finite loss stops the run
               before anything after it is saved) and, with several processes, the preemption
               vote. A checkpoint every `checkpoint.every` steps, at the end and on SIGTERM/SIGINT
  observe      (`vd_jax.train.observe`) perf.jsonl: per step the host time spent on the next
               batch while the device sat idle (perf/input_wait_s); on log steps TFLOP/s per
               device and MFU (perf/tflops_per_device, perf/mfu); `profile_steps` -> a JAX
               profiler trace in <workdir>/profile/. Timings are kept out of metrics.jsonl,
               which a resumed run reproduces bit for bit
  export       the EMA weights plus the frozen encoders the run used, as a vd_jax checkpoint
               folder (`workdir/export/step_<N>`) that `sample.py --ckpt` loads

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

from vd_jax import modalities as M
from vd_jax import sharding as shd
from vd_jax.lora import training as lora_training
from vd_jax.train import init_from, inputs, objectives, observe
from vd_jax.train.settings import ConfigError, StepConfig, parse_flows, to_plain
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
    """The diffuser of `cfg.model` with the training dtype / remat settings (None for the
    stage-0 objectives, which build their own networks)."""
    from vd_jax.models.unet import Diffuser  # noqa: PLC0415
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
    encoders: Optional[inputs.FrozenEncoders]   # encode raw records on device (or None)
    batch_sh: Dict[str, Any]
    consts: Dict[str, Any] = dataclasses.field(default_factory=dict)  # replicated batch fields
    frozen: Optional[inputs.FrozenEncoders] = None  # the encoders exported with the diffuser
    lora: Any = None              # `vd_jax.lora.training.LoraRun` when training adapters

    @property
    def flows(self):
        return self.sc.flows


def setup(cfg, workdir: str, data_source=None, mesh=None) -> Run:
    """Build the mesh, model, shardings, jitted step and the data loader of a run."""
    if cfg.get('jax_cache_dir'):
        jax.config.update('jax_compilation_cache_dir', str(cfg.jax_cache_dir))
    from vd_jax.train import validation  # noqa: PLC0415
    validation.check(cfg)
    mesh = mesh if mesh is not None else shd.create_mesh(dict(cfg.mesh))
    inputs.adopt_encoder_scales(cfg)
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
                _check_context_lengths(cfg, sc.flows, encoders)
            consts = {objectives.uncond_key(f): shd.put_global(np.asarray(u), batch_sh[
                objectives.uncond_key(f)]) for f, u in encoders.uncond_contexts(conv).items()}
    if diffusion:
        prep = inputs.HostPrep.from_config(cfg, sc.flows, encoders.components if encoders else None)
    else:
        prep = inputs.ObjectivePrep(obj, inputs.tokenizer_components(cfg.model))
    return Run(cfg=cfg, workdir=workdir, mesh=mesh, sc=sc, abstract=abstract,
               shardings=state_sh, boxed=boxed, step_fn=step_fn, source=source, loader=loader,
               host_prep=prep, encoders=encoders if cfg.data.kind in ('images', 'shapes') else None,
               batch_sh=batch_sh, consts=consts, frozen=encoders, lora=lora)


def _check_context_lengths(cfg, flows, encoders) -> None:
    """Synthetic contexts must have the real contexts' length for CFG dropout to swap in the
    unconditional ones."""
    for _, _, ctype, _ in flows:
        real = M.get(ctype).context_length(encoders.components.config)
        given = int(cfg.data.context_len[ctype])
        if given != real:
            raise ConfigError(f'cfg_dropout: {ctype} contexts have {real} tokens (the context '
                              f'encoder) but synthetic data.context_len.{ctype}={given}; set '
                              f'data.context_len.{ctype}={real} or cfg_dropout.p=0')


def frozen_encoders(cfg, flows, mesh, ckpt: Optional[str] = None) -> inputs.FrozenEncoders:
    """The frozen encoders of `cfg.encoders` (or `ckpt`) for `flows`, on `mesh`."""
    from vd_jax.sharding import normalize_rules  # noqa: PLC0415
    return inputs.FrozenEncoders(cfg.model, flows, mesh, normalize_rules(cfg.logical_axis_rules),
                                 str(cfg.encoders.ckpt if ckpt is None else ckpt),
                                 bool(cfg.encoders.vae_sample))


def initial_state(run: Run) -> TrainState:
    """A fresh state: `cfg.init.method` ('exact': the modules' initialisers, jitted into their
    shards; 'random': numpy fan-in weights, instant) then the configured init sources."""
    cfg, sc = run.cfg, run.sc
    if run.lora is not None:
        return run.lora.initial_state()
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
    """metrics.jsonl in the workdir (one line per step), perf.jsonl (timings: `write_perf`)
    and TensorBoard (both) if it is installed."""

    def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._f = None
        self._perf = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._f = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
        self._perf = open(os.path.join(workdir, 'perf.jsonl'), 'a')
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, metrics: Dict[str, float], perf: bool = False):
        if not self.enabled:
            return
        (self._perf if perf else self._f).write(json.dumps({'step': int(step), **metrics}) + '\n')
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def write_perf(self, step: int, metrics: Dict[str, float]):
        """Timings of a step (`perf/...`) to perf.jsonl and TensorBoard."""
        self.write(step, metrics, perf=True)

    def images(self, step: int, images: Dict[str, np.ndarray]):
        """Images (H, W, 3) in [0, 1] to TensorBoard (PNG files are written by their producer)."""
        if self.enabled and self._tb is not None:
            for k, v in images.items():
                self._tb.add_image(k, np.asarray(v, np.float32), step, dataformats='HWC')

    def flush(self):
        for f in (self._f, self._perf):
            if f:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        for f in (self._f, self._perf):
            if f:
                f.close()
        self._f = self._perf = None
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


def load_metrics(workdir: str, name: str = 'metrics.jsonl') -> Dict[int, Dict[str, float]]:
    """{step: metrics} from metrics.jsonl (or `name='perf.jsonl'`: the timings; a resumed
    run's later lines win)."""
    out = {}
    with open(os.path.join(workdir, name)) as f:
        for line in f:
            m = json.loads(line)
            out[m.pop('step')] = m
    return out


# ----------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------

class Preemption:
    """SIGTERM / SIGINT (Ctrl-C) -> save at the end of the current step and stop.

    The handlers are installed by `arm()` once the first step has run: before that there is
    nothing to save, and a signal during the first compile (which holds the interpreter)
    keeps the process's own action: SIGTERM's default stops the process at once, and
    train.py sets SIGINT's to the same (Python's KeyboardInterrupt would wait for the
    compile). With several processes the flags are combined at sync points
    (`requested(sync=True)`), so all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.signum = None
        self._old = {}

    def arm(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption saves
                pass

    def __enter__(self):
        return self

    def _handler(self, signum, frame):
        del frame
        logger.warning('%s received: saving a checkpoint after this step, then stopping '
                       '(send it again to stop without saving)', signal.Signals(signum).name)
        if self.flag:  # a second signal: the user means it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.flag, self.signum = True, signum

    def requested(self, sync: bool) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if not sync:
            return False
        from jax.experimental import multihost_utils  # noqa: PLC0415
        flags = multihost_utils.process_allgather(np.asarray(self.flag))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

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
    from vd_jax.train.manifest_paths import relative_to  # noqa: PLC0415
    from vd_jax.checkpoint import write_checkpoint  # noqa: PLC0415
    if objective is None:
        objective = StepConfig.from_config(cfg, make_model(cfg)).objective
    diffusion = isinstance(objective, objectives.Diffusion)
    flows = parse_flows(cfg) if diffusion else ()
    if diffusion and encoders is None and inputs.frozen_parts(flows):
        ckpt = str(cfg.encoders.get('ckpt', '') or '') or 'random'
        encoders = frozen_encoders(cfg, flows, shd.create_mesh(dict(cfg.mesh)), ckpt)
    parts = objective.export(gather(ema_params))
    frozen = {p: gather(v) for p, v in encoders.params.items()} if encoders else {}
    if jax.process_index() == 0:
        manifest = {'source': 'vd_jax training (EMA weights)', 'step': int(step),
                    'objective': str(cfg.get('objective', 'diffusion')),
                    'ema_decay': float(cfg.ema.decay), 'flows': [f[0] for f in flows],
                    'data': str(cfg.data.kind),  # e.g. 'shapes': the demo offers its examples
                    'frozen_parts_from': {p: relative_to(encoders.ckpt, run_dir or os.path.dirname(
                        os.path.abspath(out))) for p in frozen} if frozen else None}
        write_checkpoint(out, model_cfg if model_cfg is not None else cfg.model,
                         {**parts, **frozen}, manifest=manifest, overwrite=overwrite)
        logger.info('exported EMA weights of step %d to %s (parts %s)', step, out,
                    sorted(parts) + sorted(frozen))
    inputs.sync_processes('export')
    return out


def export_run(run: 'Run', ema_params, batch, out: str, step: int) -> str:
    """Export a run's EMA weights the way a finished run does: its frozen encoders, and for a
    stage-0 VAE the `latent_scale_factor` calibrated on `batch` (1 / std of its latents), so
    that diffusion trained on this export sees unit-variance latents."""
    if run.lora is not None:  # one adapter file
        return run.lora.export(ema_params, out, step)
    model_cfg = run.cfg.model
    objective = run.sc.objective
    scales = {}
    if type(objective).latent_scales is not objectives.Objective.latent_scales:
        scales = objective.latent_scales(gather(ema_params), gather(batch))
    if scales:
        model_cfg = run.cfg.model.copy_and_resolve_references()
        for m, v in scales.items():
            model_cfg.latent_scale_factor[m] = round(v, 6)
        logger.info('latent_scale_factor %s (1 / std of the latents of the last batch)',
                    dict(model_cfg.latent_scale_factor))
    return export_ema(run.cfg, ema_params, out, step, encoders=run.frozen, objective=objective,
                      model_cfg=model_cfg, run_dir=run.workdir)


def _flat(tree, prefix=''):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f'{prefix}{k}.'))
        return out
    return {prefix[:-1]: tree}


def check_same_model(cfg, workdir: str) -> None:
    """ConfigError naming every `model.*` key where `cfg` differs from the run's saved
    config.json (e.g. an export without the run's `model.schedule.prediction_type=...`
    override would write the wrong schedule); nothing to compare without a saved config."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = _flat(json.load(f).get('model', {}), 'model.')
    given = _flat(json.loads(json.dumps(to_plain(cfg.model), default=str)), 'model.')
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
    saved config.json): a differing one is a ConfigError naming the keys, before any work."""
    check_same_model(cfg, workdir)
    run = setup(cfg, workdir)
    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no checkpoint in '{ckpt.directory}' to export")
    iterator = iter(run.loader)
    state, _ = ckpt.restore(step, run.abstract, iterator)
    ckpt.close()
    batch = _global_batch(run, iterator, step, _encoder_key(cfg))
    out = out or os.path.join(workdir, 'export', f'step_{step}')
    return export_run(run, state.ema_params, batch, out, step)


def _encoder_key(cfg):
    """The key the frozen encoders' draws (VAE posterior samples) fold each step into."""
    return jax.random.PRNGKey(int(cfg.seed) + 1)


def _global_batch(run: 'Run', iterator, step_index: int, enc_key):
    """The next batch of the run's loader, on the mesh, encoded (frozen encoders, with
    `enc_key` folded with the step), with the run's constants (unconditional contexts)."""
    host = run.host_prep(next(iterator))
    batch = shd.global_batch(host, run.mesh, run.sc.rules)
    if run.encoders is not None:
        batch = run.encoders(batch, jax.random.fold_in(enc_key, step_index))
    return dict(batch, **run.consts)


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def _host_metrics(m) -> Dict[str, float]:
    return {k: (bool(v) if k == 'ok' else float(v)) for k, v in m.items()}


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drop metrics.jsonl / perf.jsonl lines after `step` (written after the checkpoint a run
    resumes from; all of them for a fresh start), so a resumed run never logs a step twice."""
    for name in ('metrics.jsonl', 'perf.jsonl'):
        path = os.path.join(workdir, name)
        if jax.process_index() != 0 or not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(lines)
        os.replace(tmp, path)


def train(cfg, workdir: str, *, data_source=None,
          hooks: Sequence[Callable[[int, Dict[str, float]], None]] = (),
          mesh=None, profile_steps: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Train `cfg` in `workdir`, resuming from its latest checkpoint if there is one.

    Args:
      cfg: a training ConfigDict (`configs/train_*.py`).
      workdir: checkpoints/, metrics.jsonl, config.json, init_report.json, export/.
      data_source: a random-access record source used instead of `cfg.data` (tests).
      hooks: called as hook(step, metrics) for every completed step, in order, when its
        metrics reach the host (at the sync points; before the step's checkpoint).
      mesh: a ready `Mesh` instead of `cfg.mesh`.
      profile_steps: (A, B): write a JAX profiler trace of steps A..B (1-based, inclusive)
        into `<workdir>/profile/` (`train.py --profile-steps A:B`).
    Returns:
      {'step', 'state' (final TrainState), 'history' ({step: metrics} of this call),
       'status' ('finished' | 'preempted'), 'export' (folder or None), 'steps_per_s',
       'perf' ({step: timings} of this call, as perf.jsonl), 'peak_tflops' (per device, or
       None) and 'flops_per_step' (per device, XLA's count, or None)}.
    Raises:
      TrainingDiverged: a step produced a non-finite loss/gradient (nothing after the last
        good checkpoint is saved).
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
    # lines of steps after the checkpoint (or of a run stopped before its first one) are
    # logged again by this run
    _truncate_metrics(workdir, start)
    logger.info('setup took %.1fs', time.time() - t_setup)

    writer = MetricWriter(workdir, is_main, bool(cfg.tensorboard))
    history: Dict[int, Dict[str, float]] = {}
    enc_key = _encoder_key(cfg)
    log_every, ckpt_every = int(cfg.log_every), int(cfg.checkpoint.every)
    val_every = int((cfg.get('validation', {}) or {}).get('every', 0) or 0)
    input_clock = observe.InputClock()
    profiler = observe.Profiler(os.path.join(workdir, 'profile'),
                                tuple(profile_steps) if profile_steps else None)
    perf: Dict[int, Dict[str, float]] = {}
    speed: Dict[str, Any] = {'flops': None, 'peak': None}

    def next_batch(step_index: int):
        with input_clock.reading(step_index + 1):
            return _next_batch(step_index)

    def _next_batch(step_index: int):
        return _global_batch(run, iterator, step_index, enc_key)

    def meta(step):
        return {'step': int(step), 'flows': [f[0] for f in run.flows],
                'config': to_plain(cfg), 'time': time.time()}

    step, status, export_dir = start, 'finished', None
    pending: List = []            # (step, device metrics) not yet on the host
    clock = {'t': None, 'first': time.time(), 'rate': float('nan')}

    def flush(now_step: int):
        """Metrics of the pending steps to the host: NaN check, metrics.jsonl, hooks, timings."""
        fetched = jax.device_get([m for _, m in pending])
        t_fetched = time.time()
        steps = [s for s, _ in pending]
        pending.clear()
        for s, m in zip(steps, fetched):
            hm = _host_metrics(m)
            if not hm.pop('ok'):
                ckpt.wait()
                last = ckpt.latest_step()
                losses = ', '.join(f'{k[5:]}={v:.4g}' for k, v in hm.items()
                                   if k.startswith('loss/'))
                where = (f'the last good checkpoint is step {last} in {ckpt.directory}'
                         if last is not None else 'no checkpoint had been written yet')
                raise TrainingDiverged(
                    f"training diverged at step {s}: loss={hm['loss']} ({losses}), "
                    f"grad_norm={hm['grad_norm']}. This step's state was NOT saved; {where}. "
                    'Resume from it with a lower optimizer.lr or grad_clip_norm, or check '
                    'the data of this step.')
            if val_every and s % val_every == 0 and s == now_step:
                from vd_jax.train import validation  # noqa: PLC0415
                t_val = time.time()
                ema = state.ema_params if run.lora is None else run.lora.merged(state.ema_params)
                val, grids = validation.validate(cfg, ema, run.frozen, s, workdir)
                hm.update(val)
                writer.images(s, grids)
                logger.info('validation at step %d (%.0fs): %s', s, time.time() - t_val,
                            ' '.join(f'{k[4:]}={v:.3f}' for k, v in sorted(val.items())
                                     if k.endswith(('/all', 'clip_score'))))
            history[s] = hm
            writer.write(s, hm)
            for hook in hooks:
                hook(s, hm)
        timings = input_clock.metrics(steps)
        log_step = now_step % log_every == 0 or now_step == total
        first = clock['t'] is None
        if first:  # the first fetch includes the compile
            logger.info('first step (compile + run) took %.1fs', t_fetched - clock['first'])
            t0 = time.time()  # a cached compile: the step already ran (observe.step_flops)
            speed['flops'], speed['peak'], where = observe.speed_limits(
                run.step_fn, state, batch, run.sc, run.mesh, str(cfg.dtype),
                float((cfg.get('perf', {}) or {}).get('peak_tflops', 0.0) or 0.0))
            logger.info('train step: %s FLOPs per device (XLA cost analysis, %.1fs); peak %s '
                        'TFLOP/s per device (%s)', f"{speed['flops']:.4g}" if speed['flops']
                        else '?', time.time() - t0,
                        f"{speed['peak']:.4g}" if speed['peak'] else '?', where)
        elif now_step > clock['step']:  # the steps since the last sync, validation excluded
            clock['rate'] = (now_step - clock['step']) / max(t_fetched - clock['t'], 1e-9)
        rate = clock['rate']
        if log_step and not first and rate == rate:
            timings.setdefault(now_step, {}).update(
                observe.utilisation(speed['flops'], speed['peak'], rate))
        for s in sorted(timings):
            perf[s] = timings[s]
            writer.write_perf(s, timings[s])
        hm = history[now_step]
        if log_step:
            known = rate == rate and rate > 0  # measured from the second fetch on
            pace = f'{rate:.2f} steps/s {rate * int(cfg.batch_size):.1f} ex/s' if known else \
                '? steps/s'
            flows = ' '.join(f'{k[5:]} {v:.4f}' for k, v in hm.items() if k.startswith('loss/'))
            logger.info('step %d/%d | loss %.4f [%s] | %s | lr %.2e | grad %.3f | ETA %s%s',
                        now_step, total, hm['loss'], flows, pace, hm['lr'], hm['grad_norm'],
                        _fmt_time((total - now_step) / rate) if known else '?',
                        observe.describe(timings, now_step))
            writer.flush()
        clock['t'], clock['step'] = time.time(), now_step

    try:
        with Preemption() as preempt:
            batch = next_batch(step) if step < total else None
            if step < total:  # a silent minute or more otherwise; Ctrl-C stops it at once
                logger.info('compiling the training step (the first step takes a while; a '
                            'compile cache: jax_cache_dir=...)')
            while step < total:
                profiler.before(step + 1)
                with profiler.annotate(step + 1):
                    state, m = run.step_fn(state, batch)
                step += 1
                input_clock.dispatched(step, jax.tree.leaves(m)[0])
                if step == start + 1:
                    preempt.arm()                  # now there is progress worth saving
                data_state = iterator.get_state()  # exactly `step` batches consumed
                if step < total:
                    batch = next_batch(step)       # host work overlaps the device step
                pending.append((step, m))
                profiler.after(step, m)
                due = step % ckpt_every == 0 or step == total
                sync = due or step % log_every == 0 or (val_every and step % val_every == 0)
                stop = preempt.requested(sync)
                if sync or stop:
                    flush(step)
                    stop = stop or preempt.requested(True)
                if stop or due:
                    # every step up to the checkpoint reaches the disk before it: a run killed
                    # after the save resumes from it and would never log them again
                    writer.flush()
                    ckpt.save(step, state, data_state, meta(step))
                if stop:
                    status = 'preempted'
                    logger.warning('stopped at step %d after saving (resume with the same '
                                   'command)', step)
                    break
        ckpt.wait()
        final_export = os.path.join(workdir, 'export', f'step_{total}')
        # also when a run resumed at its last step finds no export (stopped between the last
        # save and the export, or total_steps lowered to end a run early)
        if (status == 'finished' and bool(cfg.export.at_end) and step == total
                and (total > start or not os.path.isdir(final_export))):
            export_dir = final_export
            if batch is None:  # no step ran here: the latent-scale calibration needs a batch
                batch = next_batch(step)
            export_run(run, state.ema_params, batch, export_dir, step)
    finally:
        profiler.stop()
        input_clock.close()
        writer.close()
        ckpt.wait()
        ckpt.close()
    return {'step': step, 'state': state, 'history': history, 'status': status,
            'export': export_dir, 'steps_per_s': clock['rate'], 'perf': perf,
            'peak_tflops': speed['peak'], 'flops_per_step': speed['flops']}
