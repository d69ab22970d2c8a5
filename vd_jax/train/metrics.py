"""A run's metric files: metrics.jsonl (one line per step, reproduced bit for bit by a resumed
run), perf.jsonl (timings) and TensorBoard when it is installed."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Dict

import jax
import numpy as np

logger = logging.getLogger('vd_jax.train')


class MetricWriter:
    """metrics.jsonl in the workdir (one line per step), perf.jsonl (timings: `write_perf`)
    and TensorBoard (both) if it is installed. Only process 0 writes (`enabled`)."""

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
            self._tb = tensorboard_writer(os.path.join(workdir, 'tensorboard'))

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


def tensorboard_writer(logdir):
    """A SummaryWriter from tensorboardX or torch (optional extras), or None."""
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


def load_metrics(workdir: str, name: str = 'metrics.jsonl') -> Dict[int, Dict[str, float]]:
    """{step: metrics} from metrics.jsonl (or `name='perf.jsonl'`: the timings; a resumed
    run's later lines win)."""
    out = {}
    with open(os.path.join(workdir, name)) as f:
        for line in f:
            m = json.loads(line)
            out[m.pop('step')] = m
    return out


def truncate_metrics(workdir: str, step: int) -> None:
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


def host_metrics(m) -> Dict[str, float]:
    """A step's fetched metrics as Python numbers ('ok' stays a bool)."""
    return {k: (bool(v) if k == 'ok' else float(v)) for k, v in m.items()}


def fmt_time(s: float) -> str:
    """Seconds as '1h05m' or '4m07s' (progress lines)."""
    s = int(max(s, 0))
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'
