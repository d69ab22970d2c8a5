"""How well a training run uses its chips: FLOPs per step, MFU, input-pipeline waits, traces.

  flops        `step_flops`: XLA's cost analysis of the compiled train step, per device (the
               SPMD-partitioned program one device runs; jax caches the compile, so asking
               after the first step costs no second compile)
  peak         `peak_tflops`: the dense matmul peak of one device in the compute dtype, from
               `PEAKS` (vendor specifications) or, on CPU, measured (`measure_matmul_peak`)
  MFU          achieved FLOP/s per device (FLOPs per step x steps/s) / peak
  input wait   `InputClock`: how long the host spent reading and preparing the next batch while
               the device had nothing to run, per step (a background thread notes when each
               step's outputs are ready; nothing is fetched)
  traces       `Profiler`: a JAX profiler trace of the steps A..B into `<workdir>/profile/`

The FLOPs are what the compiled program executes: matmuls and convolutions plus elementwise
work, and with `remat=True` the recomputed forward passes too, so the ratio is closer to a
hardware FLOPs utilisation than to PaLM's model-FLOPs definition (6 x params x tokens) when
activations are rematerialised.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.errors import ConfigError

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s of ONE JAX device (first matching device_kind substring wins, case-
# insensitive), for compute dtype bfloat16 and float32, from the vendors' specification
# sheets (dense numbers; NVIDIA's sheets print the 2:4-sparsity numbers, twice these).
# float32 column: what float32 matmuls run at under JAX's default precision: one bf16 pass
# on TPU (so the bf16 peak), TF32 tensor cores on A100/H100/L4, plain FP32 on V100.
# TPU v2/v3 expose each of a chip's two TensorCores as a device (half a chip's number);
# v4 and v5p (megacore) and v5e/v6e expose one device per chip.
PEAKS = (
    ('tpu v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),    # Trillium (v6e), per chip
    ('tpu v6e', {'bfloat16': 918.0, 'float32': 918.0}),
    ('tpu v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),    # v5e, per chip
    ('tpu v5e', {'bfloat16': 197.0, 'float32': 197.0}),
    ('tpu v5p', {'bfloat16': 459.0, 'float32': 459.0}),        # v5p, per chip
    ('tpu v5', {'bfloat16': 459.0, 'float32': 459.0}),         # v5p reports 'TPU v5'
    ('tpu v4', {'bfloat16': 275.0, 'float32': 275.0}),         # per chip (megacore)
    ('tpu v3', {'bfloat16': 61.5, 'float32': 61.5}),           # 123 per chip, 2 cores
    ('tpu v2', {'bfloat16': 22.5, 'float32': 22.5}),           # 45 per chip, 2 cores
    ('h100 pcie', {'bfloat16': 756.0, 'float32': 378.0}),
    ('h100', {'bfloat16': 989.4, 'float32': 494.7}),           # SXM (H100 80GB HBM3)
    ('h200', {'bfloat16': 989.4, 'float32': 494.7}),
    ('a100', {'bfloat16': 312.0, 'float32': 156.0}),           # SXM and PCIe alike
    ('l4', {'bfloat16': 121.0, 'float32': 60.0}),
    ('v100', {'bfloat16': 125.0, 'float32': 15.7}),            # fp16 tensor cores; SXM2
)

_MEASURED: Dict[Tuple[str, int], float] = {}


def table_peak(device_kind: str, dtype: str) -> Optional[float]:
    """Peak TFLOP/s of one device of this `device_kind` (e.g. 'TPU v4', 'NVIDIA A100-SXM4-80GB')
    in `dtype` from `PEAKS`, or None if the kind is not in the table."""
    kind = device_kind.lower()
    for pattern, peaks in PEAKS:
        if pattern in kind:
            return peaks['bfloat16' if dtype == 'bfloat16' else 'float32']
    return None


def matmul_seconds(dtype: str = 'float32', n: int = 2048, min_seconds: float = 1.0,
                   min_reps: int = 3, warmup: int = 2) -> List[float]:
    """Seconds of each timed call of a jitted square (n x n) matmul in `dtype` on the default
    device (standard-normal inputs from seeds 0 and 1; 2 n^3 FLOPs a call): at least
    `min_reps` calls and `min_seconds` in all, after `warmup` untimed calls."""
    dt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), dt)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32), dt)
    mm = jax.jit(jnp.matmul)
    for _ in range(warmup):
        mm(a, b).block_until_ready()
    times, t_all = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - t_all < min_seconds:
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def measure_matmul_peak(dtype: str = 'float32', n: int = 2048, min_seconds: float = 1.0,
                        min_reps: int = 3) -> float:
    """TFLOP/s of a jitted square (n x n) matmul in `dtype` on the default device, measured
    now: the median of `matmul_seconds` (at least `min_reps` timed calls and `min_seconds` of
    them, after two warm-up calls). Cached per (dtype, n) for the process."""
    key = (str(dtype), int(n))
    if key not in _MEASURED:
        times = matmul_seconds(dtype, n, min_seconds, min_reps)
        _MEASURED[key] = 2.0 * n ** 3 / float(np.median(times)) / 1e12
    return _MEASURED[key]


def peak_tflops(dtype: str, override: float = 0.0, device=None) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s of one device, where the number comes from).

    `override` > 0 wins (config `perf.peak_tflops`); else the `PEAKS` table; else on CPU the
    measured matmul peak divided by the number of local CPU devices (host "devices" made
    with --xla_force_host_platform_device_count share the same cores); else (None, reason).
    """
    if override and override > 0:
        return float(override), 'config perf.peak_tflops'
    device = device or jax.local_devices()[0]
    peak = table_peak(device.device_kind, dtype)
    if peak is not None:
        return peak, f"table: '{device.device_kind}' {dtype} (vd_jax.train.observe.PEAKS)"
    if device.platform == 'cpu':
        n_local = max(1, len(jax.local_devices()))
        measured = measure_matmul_peak(dtype)
        return measured / n_local, (f'measured: jitted 2048^2 {dtype} matmul {measured:.3f} '
                                    f'TFLOP/s / {n_local} local CPU device(s)')
    return None, (f"unknown device kind '{device.device_kind}': set perf.peak_tflops "
                  '(TFLOP/s of one device) for MFU')


def step_flops(step_fn, state, batch, sc, mesh) -> Optional[float]:
    """FLOPs one device executes per call of the jitted train step (`jit_train_step`'s
    function), from XLA's cost analysis of the compiled, partitioned program. The arguments
    only give shapes and shardings; after the step has run once the compile is cached."""
    with jax.set_mesh(mesh):
        compiled = step_fn.jitted.lower(state, batch, sc).compile()
    flops = cost_analysis(compiled).get('flops')
    return float(flops) if flops is not None and flops > 0 else None


def cost_analysis(compiled) -> Dict[str, float]:
    """XLA's cost analysis of a compiled executable (`jitted.lower(...).compile()`) as one
    dict: 'flops' (all ops, elementwise included), 'transcendentals', 'bytes accessed', ...;
    {} when the backend gives none."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def speed_limits(step_fn, state, batch, sc, mesh, dtype: str, override: float = 0.0
                 ) -> Tuple[Optional[float], Optional[float], str]:
    """(FLOPs per step per device, peak TFLOP/s per device, where the peak comes from) for the
    training loop; a failure of either is logged and gives None: observing never stops a run."""
    try:
        flops = step_flops(step_fn, state, batch, sc, mesh)
    except Exception as e:  # noqa: BLE001 -- a backend without cost analysis
        logger.warning('no FLOP count of the train step (%s: %s): no perf/mfu',
                       type(e).__name__, e)
        flops = None
    try:
        peak, where = peak_tflops(dtype, override)
    except Exception as e:  # noqa: BLE001
        peak, where = None, f'peak unavailable ({type(e).__name__}: {e})'
    return flops, peak, where


def utilisation(flops: Optional[float], peak: Optional[float], steps_per_s: float
                ) -> Dict[str, float]:
    """perf/step_s, and with a FLOP count perf/tflops_per_device (FLOPs per step per device x
    steps/s), and with a peak perf/mfu (that / the peak)."""
    out = {'perf/step_s': 1.0 / steps_per_s}
    if flops:
        out['perf/tflops_per_device'] = flops * steps_per_s / 1e12
        if peak:
            out['perf/mfu'] = out['perf/tflops_per_device'] / peak
    return out


def describe(timings: Dict[int, Dict[str, float]], step: int) -> str:
    """' | MFU x% y TFLOP/s/dev | input wait z s/step' for the progress line."""
    pm = timings.get(step, {})
    waits = [t['perf/input_wait_s'] for t in timings.values() if 'perf/input_wait_s' in t]
    out = f" | MFU {100 * pm['perf/mfu']:.1f}%" if 'perf/mfu' in pm else ''
    if 'perf/tflops_per_device' in pm:
        out += f" {pm['perf/tflops_per_device']:.3g} TFLOP/s/dev"
    if waits:
        out += f' | input wait {sum(waits) / len(waits):.3f}s/step'
    return out


# ----------------------------------------------------------------------------------------
# Input-pipeline waits
# ----------------------------------------------------------------------------------------

class InputClock:
    """Per step: host seconds spent getting the batch (`perf/input_s`) and the part of them
    during which the device had finished the previous step and sat idle (`perf/input_wait_s`).

    The loop calls `dispatched(step, out)` after launching step `step` (out: any array it
    returns) and brackets the reading of the NEXT step's batch with `reading(step + 1)`. A
    daemon thread blocks on each `out` in turn and notes when it became ready, so nothing is
    fetched and the loop never waits for it. For step s the wait is
    max(0, end_of_reading(s) - max(start_of_reading(s), ready(s - 1))).
    """

    def __init__(self):
        self._q: 'queue.Queue' = queue.Queue()
        self._ready: Dict[int, float] = {}
        self._read: Dict[int, Tuple[float, float]] = {}
        self._thread = threading.Thread(target=self._run, name='vd_jax-input-clock', daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                step, out = item
                try:
                    out.block_until_ready()
                except Exception:  # noqa: BLE001 -- the loop sees a failed step itself
                    pass
                self._ready[step] = time.perf_counter()
            finally:
                self._q.task_done()

    def dispatched(self, step: int, out) -> None:
        self._q.put((int(step), out))

    @contextlib.contextmanager
    def reading(self, step: int):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._read[int(step)] = (t0, time.perf_counter())

    def metrics(self, steps) -> Dict[int, Dict[str, float]]:
        """{step: {'perf/input_s', 'perf/input_wait_s'}} for those of `steps` whose batch and
        previous step are known (all of them once their outputs were fetched); forgets them."""
        self._q.join()  # every dispatched step so far has its ready time
        out = {}
        for s in steps:
            read = self._read.pop(s, None)
            prev = self._ready.get(s - 1)
            if read is None or prev is None:
                continue
            t0, t1 = read
            out[s] = {'perf/input_s': t1 - t0, 'perf/input_wait_s': max(0.0, t1 - max(t0, prev))}
        done = max(steps, default=None)
        if done is not None:
            for s in [s for s in self._ready if s < done]:
                del self._ready[s]
        return out

    def close(self):
        self._q.put(None)
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------------------
# Profiler traces
# ----------------------------------------------------------------------------------------

def parse_profile_steps(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    """'A:B' (1 <= A <= B; steps numbered as logged, step 1 is the first) -> (A, B); 'A' means
    A:A; None or '' -> None."""
    if spec is None or str(spec).strip() == '':
        return None
    m = re.fullmatch(r'\s*(\d+)\s*(?::\s*(\d+)\s*)?', str(spec))
    if not m:
        raise ConfigError(f"--profile-steps {spec!r}: expected A:B (e.g. 10:15), steps >= 1")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if a < 1 or b < a:
        raise ConfigError(f'--profile-steps {spec!r}: need 1 <= A <= B')
    return a, b


class Profiler:
    """A JAX profiler trace (XProf / TensorBoard's profile plugin) of steps A..B into
    `logdir` (`plugins/profile/<time>/<host>.xplane.pb`, one file per process). Each traced
    step is annotated as a train step; the trace stops once step B's outputs are ready."""

    def __init__(self, logdir: str, steps: Optional[Tuple[int, int]]):
        self.logdir, self.steps = logdir, steps
        self.active = False
        self.done = steps is None

    def before(self, step: int) -> None:
        """Call before launching step `step` (1-based)."""
        if self.done or self.active or step < self.steps[0]:
            return
        os.makedirs(self.logdir, exist_ok=True)
        jax.profiler.start_trace(self.logdir)
        self.active = True
        logger.info('profiling steps %d..%d into %s', step, self.steps[1], self.logdir)

    def annotate(self, step: int):
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation('train', step_num=int(step))

    def after(self, step: int, out) -> None:
        """Call after launching step `step`; at step B waits for `out` and stops the trace."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(out)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            logger.info('profile written to %s (tensorboard --logdir %s, with the profile '
                        'plugin / xprof installed)', self.logdir, self.logdir)
