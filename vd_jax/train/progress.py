"""`Reporter`: what a run does at its sync points, when the metrics of the steps since the last
one reach the host: the NaN check, validation, metrics.jsonl and the hooks, the timings
(perf.jsonl, MFU) and the progress line with its ETA.

Between sync points the step's metrics stay on the device (`add`), so the host never waits for
a step it does not have to.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax

from vd_jax.errors import TrainingDiverged
from vd_jax.train import observe, validation
from vd_jax.train.checkpointer import Checkpointer
from vd_jax.train.metrics import MetricWriter, fmt_time, host_metrics

logger = logging.getLogger('vd_jax.train')


class Reporter:
    """The sync points of one `train` call.

    `history` ({step: metrics}) and `perf` ({step: timings}) collect what this call logged;
    `rate` is the measured steps/s (NaN until the second sync point), `flops` / `peak` the
    step's FLOPs and the device peak (`observe.speed_limits`, asked at the first sync point).
    """

    def __init__(self, run, writer: MetricWriter, ckpt: Checkpointer,
                 input_clock: observe.InputClock,
                 hooks: Sequence[Callable[[int, Dict[str, float]], None]] = ()):
        cfg = run.cfg
        self.run, self.cfg, self.writer, self.ckpt = run, cfg, writer, ckpt
        self.input_clock, self.hooks = input_clock, tuple(hooks)
        self.total = int(cfg.total_steps)
        self.log_every = int(cfg.log_every)
        self.val_every = int((cfg.get('validation', {}) or {}).get('every', 0) or 0)
        self.pending: List[Tuple[int, Any]] = []   # (step, device metrics) not yet on the host
        self.history: Dict[int, Dict[str, float]] = {}
        self.perf: Dict[int, Dict[str, float]] = {}
        self.rate = float('nan')
        self.flops = self.peak = None
        self._started = time.time()
        self._last = None                          # (time, step) of the last sync point

    def add(self, step: int, device_metrics) -> None:
        """A dispatched step's metrics (still on the device)."""
        self.pending.append((step, device_metrics))

    def due(self, step: int) -> bool:
        """Whether `step` is a log or validation step (checkpoints are the loop's business)."""
        return step % self.log_every == 0 or bool(self.val_every and step % self.val_every == 0)

    def sync(self, now_step: int, state, batch) -> None:
        """Fetch the pending steps' metrics and report them (`now_step` is the last one)."""
        fetched = jax.device_get([m for _, m in self.pending])
        t_fetched = time.time()
        steps = [s for s, _ in self.pending]
        self.pending.clear()
        for s, m in zip(steps, fetched):
            hm = host_metrics(m)
            if not hm.pop('ok'):
                self._diverged(s, hm)
            if self.val_every and s % self.val_every == 0 and s == now_step:
                hm.update(self._validate(s, state))
            self.history[s] = hm
            self.writer.write(s, hm)
            for hook in self.hooks:
                hook(s, hm)
        timings = self.input_clock.metrics(steps)
        log_step = now_step % self.log_every == 0 or now_step == self.total
        first = self._last is None
        if first:  # the first fetch includes the compile
            logger.info('first step (compile + run) took %.1fs', t_fetched - self._started)
            self._speed_limits(state, batch)
        elif now_step > self._last[1]:  # the steps since the last sync, validation excluded
            self.rate = (now_step - self._last[1]) / max(t_fetched - self._last[0], 1e-9)
        if log_step and not first and self.rate == self.rate:
            timings.setdefault(now_step, {}).update(
                observe.utilisation(self.flops, self.peak, self.rate))
        for s in sorted(timings):
            self.perf[s] = timings[s]
            self.writer.write_perf(s, timings[s])
        if log_step:
            self._progress_line(now_step, timings)
            self.writer.flush()
        self._last = (time.time(), now_step)

    def _diverged(self, step: int, hm: Dict[str, float]) -> None:
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        losses = ', '.join(f'{k[5:]}={v:.4g}' for k, v in hm.items() if k.startswith('loss/'))
        where = (f'the last good checkpoint is step {last} in {self.ckpt.directory}'
                 if last is not None else 'no checkpoint had been written yet')
        raise TrainingDiverged(
            f"training diverged at step {step}: loss={hm['loss']} ({losses}), "
            f"grad_norm={hm['grad_norm']}. This step's state was NOT saved; {where}. "
            'Resume from it with a lower optimizer.lr or grad_clip_norm, or check the data of '
            'this step.')

    def _validate(self, step: int, state) -> Dict[str, float]:
        run = self.run
        t_val = time.time()
        ema = state.ema_params if run.lora is None else run.lora.merged(state.ema_params)
        val, grids = validation.validate(self.cfg, ema, run.frozen, step, run.workdir)
        self.writer.images(step, grids)
        logger.info('validation at step %d (%.0fs): %s', step, time.time() - t_val,
                    ' '.join(f'{k[4:]}={v:.3f}' for k, v in sorted(val.items())
                             if k.endswith(('/all', 'clip_score'))))
        return val

    def _speed_limits(self, state, batch) -> None:
        """The step's FLOPs (a cached compile: the step already ran) and the device peak."""
        t0 = time.time()
        cfg = self.cfg
        self.flops, self.peak, where = observe.speed_limits(
            self.run.step_fn, state, batch, self.run.sc, self.run.mesh, str(cfg.dtype),
            float((cfg.get('perf', {}) or {}).get('peak_tflops', 0.0) or 0.0))
        logger.info('train step: %s FLOPs per device (XLA cost analysis, %.1fs); peak %s '
                    'TFLOP/s per device (%s)', f'{self.flops:.4g}' if self.flops else '?',
                    time.time() - t0, f'{self.peak:.4g}' if self.peak else '?', where)

    def _progress_line(self, step: int, timings) -> None:
        hm, rate = self.history[step], self.rate
        known = rate == rate and rate > 0  # measured from the second fetch on
        pace = (f'{rate:.2f} steps/s {rate * int(self.cfg.batch_size):.1f} ex/s' if known
                else '? steps/s')
        flows = ' '.join(f'{k[5:]} {v:.4f}' for k, v in hm.items() if k.startswith('loss/'))
        logger.info('step %d/%d | loss %.4f [%s] | %s | lr %.2e | grad %.3f | ETA %s%s',
                    step, self.total, hm['loss'], flows, pace, hm['lr'], hm['grad_norm'],
                    fmt_time((self.total - step) / rate) if known else '?',
                    observe.describe(timings, step))
