"""Training observability: FLOPs / MFU, input-pipeline waits, profiler traces, validation
images in TensorBoard (`vd_jax.train.observe`, `vd_jax.train.loop`).

One short real run of `configs/train_tiny.py:test` (the trainer tests' step settings, so the
compiled step is shared with them in one session) with validation (CLIP score on two
prompts) and a profile of steps 3..4; its TensorBoard event file is read back record by
record. The FLOPs XLA reports are cross-checked against the matmul/convolution FLOPs parsed
from the compiled HLO (benchmarks/common.py `hlo_dot_conv_flops`, the count torch's FLOP
counter makes): XLA's count adds the elementwise work but leaves out the products with a
convolution's zero padding, which the parse counts (on the 8 x 8 latents of this model a
3 x 3 kernel overlaps the border at 28 of 64 positions); measured 0.97 x here, bounds
0.8 x .. 2 x.
"""
import glob
import gzip
import importlib.util
import io
import json
import os
import struct
import threading
import time

import jax
import numpy as np
import pytest

import train_helper
from vd_jax.config import load_config
from vd_jax.errors import ConfigError
from vd_jax.train import observe
from vd_jax.train import load_metrics, setup, train
from vd_jax.train.settings import apply_overrides

ROOT = os.path.join(os.path.dirname(__file__), '..')
PROMPTS = ['a red circle', 'a blue square']


def _cfg(*extra):
    cfg = load_config(train_helper.CONFIG)
    apply_overrides(cfg, train_helper.SHARED + ['checkpoint.every=1000', *extra])
    return cfg


def _events(workdir):
    """(scalars {(step, tag): value}, images {(step, tag): png bytes}) of the run's event file."""
    from tensorboardX.proto import event_pb2
    (event_file,) = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
    data = open(event_file, 'rb').read()
    scalars, images = {}, {}
    while data:  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack('<Q', data[:8])
        ev = event_pb2.Event.FromString(data[12:12 + n])
        data = data[16 + n:]
        for v in ev.summary.value:
            if v.HasField('image'):
                images[(ev.step, v.tag)] = (v.image.encoded_image_string, v.image.height,
                                            v.image.width)
            else:
                scalars[(ev.step, v.tag)] = v.simple_value
    return scalars, images


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('observe'))
    cfg = _cfg('total_steps=4', 'log_every=2', 'tensorboard=True', 'validation.every=4',
               "validation.metrics=['clip_score']", f'validation.prompts={PROMPTS!r}',
               'validation.steps=2', 'export.at_end=False')
    out = train(cfg, workdir, profile_steps=(3, 4))
    return dict(cfg=cfg, workdir=workdir, out=out)


@pytest.mark.slow
def test_mfu_and_input_waits_are_logged(run):
    out, workdir = run['out'], run['workdir']
    perf = load_metrics(workdir, 'perf.jsonl')
    assert perf == {s: pytest.approx(v) for s, v in out['perf'].items()}
    # per step, from the second on (the first has no previous step to compare with)
    assert sorted(perf) == [2, 3, 4]
    for s in (2, 3, 4):
        assert 0 <= perf[s]['perf/input_wait_s'] <= perf[s]['perf/input_s'] + 1e-9
    # (how long the waits are is a timing, not checked here: on a loaded 2-core host one
    # synthetic batch took 0.16 s with the device idle throughout, 2026-12-07)
    print('input s', [round(perf[s]['perf/input_s'], 4) for s in (2, 3, 4)],
          'wait s', [round(perf[s]['perf/input_wait_s'], 4) for s in (2, 3, 4)])
    # TFLOP/s and MFU on the log step that has a measured interval (step 2's includes the
    # compile): XLA's FLOPs per device x steps/s, against the measured CPU matmul peak
    assert 'perf/mfu' not in perf[2] and 'perf/mfu' not in perf[3]
    p4 = perf[4]
    flops, peak = out['flops_per_step'], out['peak_tflops']
    assert p4['perf/tflops_per_device'] == pytest.approx(flops / p4['perf/step_s'] / 1e12, rel=1e-6)
    assert p4['perf/mfu'] == pytest.approx(p4['perf/tflops_per_device'] / peak, rel=1e-6)
    print(f"flops/step {flops:.4g}, step {p4['perf/step_s']:.4f}s, "
          f"{p4['perf/tflops_per_device']:.4g} TFLOP/s, peak {peak:.4g}, MFU {p4['perf/mfu']:.3f}")
    assert 0 < p4['perf/mfu'] < 1.5  # a measured CPU peak under load can be beaten a little
    # timings stay out of metrics.jsonl, which a resumed run reproduces bit for bit
    metrics = load_metrics(workdir)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert not any(k.startswith('perf/') for m in metrics.values() for k in m)


@pytest.mark.slow
def test_xla_flops_against_the_hlo_matmul_count(run):
    spec = importlib.util.spec_from_file_location('bench_common',
                                                  os.path.join(ROOT, 'benchmarks', 'common.py'))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    r = setup(run['cfg'], run['workdir'] + '_again')
    state = run['out']['state']
    from vd_jax import sharding as shd
    host = r.host_prep(next(iter(r.loader)))
    batch = dict(shd.global_batch(host, r.mesh, r.sc.rules), **r.consts)
    with jax.set_mesh(r.mesh):
        compiled = r.step_fn.jitted.lower(state, batch, r.sc).compile()
    dot_conv = common.hlo_dot_conv_flops(compiled)
    flops = run['out']['flops_per_step']
    print(f'XLA flops {flops:.4g}, dot+conv from the HLO {dot_conv:.4g} ({flops / dot_conv:.3f}x)')
    assert 0.8 * dot_conv <= flops <= 2 * dot_conv
    assert observe.step_flops(r.step_fn, state, batch, r.sc, r.mesh) == flops


@pytest.mark.slow
def test_validation_images_and_metrics_reach_tensorboard(run):
    scalars, images = _events(run['workdir'])
    assert (4, 'val/t2i/clip_score') in scalars
    metrics = load_metrics(run['workdir'])
    assert scalars[(4, 'val/t2i/clip_score')] == pytest.approx(metrics[4]['val/t2i/clip_score'])
    assert scalars[(1, 'loss')] == pytest.approx(metrics[1]['loss'], rel=1e-6)
    assert (4, 'perf/mfu') in scalars and (3, 'perf/input_wait_s') in scalars
    png, h, w = images[(4, 'val/t2i_prompts')]
    from PIL import Image
    grid = np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))
    side = int(run['cfg'].model.image_size)
    assert grid.shape == (h, w, 3) == (side + 4, 2 * side + 6, 3)  # 2 samples, 2 px padding
    assert grid[2:2 + side, 2:2 + side].std() > 0  # a sample, not padding


@pytest.mark.slow
def test_profile_trace_of_the_requested_steps(run):
    (folder,) = glob.glob(os.path.join(run['workdir'], 'profile', 'plugins', 'profile', '*'))
    (xplane,) = glob.glob(os.path.join(folder, '*.xplane.pb'))
    assert os.path.getsize(xplane) > 0
    (trace,) = glob.glob(os.path.join(folder, '*.trace.json.gz'))
    events = json.load(gzip.open(trace))
    events = events['traceEvents'] if isinstance(events, dict) else events
    steps = sorted(int(e['args']['step_num']) for e in events if e.get('name') == 'train')
    assert steps == [3, 4]
    assert any('train_step' in str(e.get('name')) for e in events)


@pytest.mark.slow
def test_an_input_bound_run_shows_its_waits(tmp_path, monkeypatch):
    """Host preparation slower than the device step: the wait is most of the input time."""
    from vd_jax.train import inputs
    original = inputs.HostPrep.__call__

    def slow(self, batch):
        time.sleep(0.4)
        return original(self, batch)
    monkeypatch.setattr(inputs.HostPrep, '__call__', slow)
    out = train(_cfg('total_steps=4', 'log_every=2', 'export.at_end=False'), str(tmp_path))
    waits = [out['perf'][s]['perf/input_wait_s'] for s in (2, 3, 4)]
    reads = [out['perf'][s]['perf/input_s'] for s in (2, 3, 4)]
    step_s = out['perf'][4]['perf/step_s']
    print(f'input s {np.round(reads, 3)}, wait s {np.round(waits, 3)}, step {step_s:.3f}s')
    assert min(reads) >= 0.4
    assert np.mean(waits) >= 0.5 * np.mean(reads)


# ----------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------

class _FakeOutput:
    """An 'array' that becomes ready `delay` seconds after it is made."""

    def __init__(self, delay):
        self.ready = threading.Event()
        threading.Timer(delay, self.ready.set).start()

    def block_until_ready(self):
        self.ready.wait()
        return self


def test_input_clock_counts_only_the_idle_part():
    clock = observe.InputClock()
    try:
        clock.dispatched(1, _FakeOutput(0.3))       # the device is busy for 0.3 s
        with clock.reading(2):                       # reading takes 0.1 s: no wait
            time.sleep(0.1)
        time.sleep(0.3)
        clock.dispatched(2, _FakeOutput(0.05))      # done after 0.05 s
        with clock.reading(3):                       # reading takes 0.3 s: ~0.25 s idle
            time.sleep(0.3)
        m = clock.metrics([1, 2, 3])
    finally:
        clock.close()
    assert sorted(m) == [2, 3]  # step 1 has no previous step
    assert m[2]['perf/input_wait_s'] == 0.0 and m[2]['perf/input_s'] >= 0.1
    assert 0.15 <= m[3]['perf/input_wait_s'] <= m[3]['perf/input_s']
    print({s: {k: round(v, 3) for k, v in x.items()} for s, x in m.items()})


def test_peaks():
    assert observe.table_peak('TPU v4', 'bfloat16') == 275.0
    assert observe.table_peak('TPU v5 lite', 'bfloat16') == 197.0
    assert observe.table_peak('TPU v5p', 'float32') == 459.0
    assert observe.table_peak('TPU v6 lite', 'bfloat16') == 918.0
    assert observe.table_peak('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
    assert observe.table_peak('NVIDIA A100-SXM4-80GB', 'float32') == 156.0  # TF32
    assert observe.table_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
    assert observe.table_peak('NVIDIA H100 PCIe', 'bfloat16') == 756.0
    assert observe.table_peak('cpu', 'float32') is None
    assert observe.peak_tflops('float32', override=12.5) == (12.5, 'config perf.peak_tflops')
    peak, where = observe.peak_tflops('float32')  # this machine: measured
    assert 'measured' in where and peak == observe.measure_matmul_peak('float32') / len(
        jax.local_devices())
    assert 1e-4 < peak < 100  # TFLOP/s of a CPU


@pytest.mark.slow
def test_profile_steps_flag():
    assert observe.parse_profile_steps('3:5') == (3, 5)
    assert observe.parse_profile_steps(' 7 ') == (7, 7)
    assert observe.parse_profile_steps(None) is None
    for bad in ('0:2', '5:3', 'a:b', '3-5'):
        with pytest.raises(ConfigError, match='--profile-steps'):
            observe.parse_profile_steps(bad)
    import subprocess
    import sys
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config',
                        'configs/train_tiny.py:test', '--workdir', '/nonexistent/never',
                        '--profile-steps', '4:2'], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2 and '--profile-steps' in p.stderr and 'A <= B' in p.stderr, p.stderr
