"""`train`: the training loop with Orbax checkpoints, resume, metrics and export.

  setup        (`run.py`) mesh, model, step settings, shardings, data loader, frozen encoders
  state        restore the latest checkpoint (`checkpointer.py`: train state + EMA + data
               iterator), or initialise (exact / random) and copy parameters from
               `cfg.init.sources`
  loop         host batch -> global batch -> [encoders] -> jitted step; the next batch is read
               while the device runs. Metrics stay on device and are fetched at sync points
               (every `log_every` steps, before each checkpoint, at the end; `progress.py`):
               one line per step to metrics.jsonl (`metrics.py`), a progress line with ETA, the
               NaN check (a non-finite loss stops the run before anything after it is saved)
               and, with several processes, the preemption vote (`preemption.py`). A
               checkpoint every `checkpoint.every` steps, at the end and on SIGTERM/SIGINT
  observe      (`vd_jax.train.observe`) perf.jsonl: per step the host time spent on the next
               batch while the device sat idle (perf/input_wait_s); on log steps TFLOP/s per
               device and MFU (perf/tflops_per_device, perf/mfu); `profile_steps` -> a JAX
               profiler trace in <workdir>/profile/. Timings are kept out of metrics.jsonl,
               which a resumed run reproduces bit for bit
  export       (`export.py`) the EMA weights plus the frozen encoders the run used, as a vd_jax
               checkpoint folder (`workdir/export/step_<N>`) that `sample.py --ckpt` loads

Resuming is exact: the step's randomness is a function of (seed, step), the grain iterator
state is saved with each checkpoint (captured *before* the next batch is prefetched), and the
same program runs on the same inputs, so a resumed run reproduces an uninterrupted one bit for
bit on the same mesh.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax

from vd_jax import sharding as shd
from vd_jax.errors import CheckpointError
from vd_jax.train import observe
from vd_jax.train.checkpointer import Checkpointer
from vd_jax.train.export import export_run
from vd_jax.train.metrics import MetricWriter, truncate_metrics
from vd_jax.train.preemption import Preemption
from vd_jax.train.progress import Reporter
from vd_jax.train.run import encoder_key, global_batch, initial_state, setup
from vd_jax.train.settings import to_plain

logger = logging.getLogger('vd_jax.train')


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
      vd_jax.errors.TrainingDiverged: a step produced a non-finite loss/gradient (nothing after the last
        good checkpoint is saved).
    """
    t_setup = time.time()
    run = setup(cfg, workdir, data_source=data_source, mesh=mesh)
    total = int(cfg.total_steps)
    is_main = jax.process_index() == 0
    logger.info('%s; flows %s; global batch %d', shd.describe(run.mesh),
                [f.name for f in run.flows], int(cfg.batch_size))
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(to_plain(cfg), f, indent=1, sort_keys=True, default=str)

    # the latest checkpoint (state, EMA, data position), or a fresh state
    ckpt = Checkpointer(workdir, keep=int(cfg.checkpoint.keep),
                        async_save=bool(cfg.checkpoint.async_save))
    iterator = iter(run.loader)
    start = ckpt.latest_step()
    if start is not None:
        state, _ = ckpt.restore(start, run.abstract, iterator)
        logger.info('resumed from step %d (%s)', start, ckpt.directory)
        if int(state.step) != start:
            raise CheckpointError(f'checkpoint {start} in {ckpt.directory} holds a state of '
                                  f'step {int(state.step)}')
    else:
        start = 0
        state = initial_state(run)
    # lines of steps after the checkpoint (or of a run stopped before its first one) are
    # logged again by this run
    truncate_metrics(workdir, start)
    logger.info('setup took %.1fs', time.time() - t_setup)

    writer = MetricWriter(workdir, is_main, bool(cfg.tensorboard))
    input_clock = observe.InputClock()
    profiler = observe.Profiler(os.path.join(workdir, 'profile'),
                                tuple(profile_steps) if profile_steps else None)
    reporter = Reporter(run, writer, ckpt, input_clock, hooks)
    enc_key = encoder_key(cfg)
    ckpt_every = int(cfg.checkpoint.every)

    def next_batch(step_index: int):
        with input_clock.reading(step_index + 1):
            return global_batch(run, iterator, step_index, enc_key)

    def meta(step):
        return {'step': int(step), 'flows': [f.name for f in run.flows],
                'config': to_plain(cfg), 'time': time.time()}

    step, status, export_dir = start, 'finished', None
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
                reporter.add(step, m)
                profiler.after(step, m)
                due = step % ckpt_every == 0 or step == total
                sync = due or reporter.due(step)
                stop = preempt.requested(sync)
                if sync or stop:
                    reporter.sync(step, state, batch)
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
    return {'step': step, 'state': state, 'history': reporter.history, 'status': status,
            'export': export_dir, 'steps_per_s': reporter.rate, 'perf': reporter.perf,
            'peak_tflops': reporter.peak, 'flops_per_step': reporter.flops}
