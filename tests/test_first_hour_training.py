"""train.py as a newcomer meets it: the README's example on a folder of images gives an export
that sample.py uses for every flow; bad training data is one clear error with nothing left in
the workdir; Ctrl-C keeps the work (checkpoint, exit code 75, resume) but stops a first compile
at once; metrics.jsonl holds every step exactly once however a run was stopped."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the smallest four-flow-capable model, one flow: a first compile of ~30 s on this machine
SMALL = ['--config', 'configs/train_tiny.py:test', "flows=['t2t']", 'log_every=1']
README = ['--config', 'configs/train_tiny.py']  # the README's example


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
                XDG_CACHE_HOME=str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
    """One persistent compile cache for the runs of this module (a restart compiles nothing)."""
    return str(tmp_path_factory.mktemp('xla'))


def train_cmd(workdir, *overrides, config=SMALL):
    return [sys.executable, os.path.join(ROOT, 'train.py'), '--workdir', str(workdir), *config,
            *overrides]


def train(env, workdir, *overrides, config=SMALL, timeout=900):
    r = subprocess.run(train_cmd(workdir, *overrides, config=config), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def image_folder(d, n=6, captions=True):
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f'p{i}.png')
        if captions:
            (d / f'p{i}.txt').write_text(f'a photo of thing number {i}')
    return d


def metric_steps(workdir):
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)['step'] for line in f if line.strip()]


def checkpoints(workdir):
    d = os.path.join(workdir, 'checkpoints')
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def start(env, workdir, *overrides):
    log = open(os.path.join(os.path.dirname(str(workdir)), f'{os.path.basename(str(workdir))}.log'),
               'w+')
    p = subprocess.Popen(train_cmd(workdir, *overrides), cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    return p, log


def wait_for(p, log, until, timeout=600):
    """Poll until `until()` is true; fails (with the log) if the process ends first."""
    t0 = time.time()
    while not until():
        if p.poll() is not None:
            log.seek(0)
            pytest.fail(f'train.py ended ({p.returncode}) before the awaited moment:\n'
                        + log.read()[-3000:])
        if time.time() - t0 > timeout:
            p.kill()
            pytest.fail('timed out')
        time.sleep(0.05)


def read(log):
    log.seek(0)
    return log.read()


# ------------------------------------------------------------------------------------------------
# The README's example
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_readme_training_example_gives_an_export_every_flow_samples_from(env, tmp_path):
    photos, work = image_folder(tmp_path / 'photos'), tmp_path / 'W'
    code, out, err = train(env, work, 'data.kind=images', f'data.path={photos}',
                           'data.filters=none', 'encoders.ckpt=random', 'total_steps=2',
                           config=README)
    assert code == 0, err[-3000:]
    export = work / 'export' / 'step_2'
    assert export.is_dir(), err[-3000:]
    # honest, quiet output in a log: no library chatter, no progress-bar escape codes
    for noise in ('OpenCV', 'Downloading and preparing', 'Using custom data configuration',
                  'Variant folder', 'PyTorch was not found', 'nan steps/s', '\r', '\x1b'):
        assert noise not in err, (noise, err[-3000:])
    image = str(photos / 'p0.png')
    for task, inputs in (('t2i', ['--prompt', 'a photo']), ('i2i', ['--image', image]),
                         ('i2t', ['--image', image]), ('t2t', ['--prompt', 'a photo'])):
        r = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--ckpt', str(export),
                            '--task', task, *inputs, '--steps', '2', '--n', '1', '--out',
                            str(tmp_path / 'samples')], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, (task, r.stderr[-3000:])
        assert f'loaded {export}' in r.stderr
    runs = sorted(os.listdir(tmp_path / 'samples'))
    assert runs == ['run-001', 'run-002', 'run-003', 'run-004']
    for run, kind in zip(runs, ('0000.png', '0000.png', 'texts.json', 'texts.json')):
        assert (tmp_path / 'samples' / run / kind).exists()


# ------------------------------------------------------------------------------------------------
# Training data that cannot work: one error, exit 2, nothing left behind
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('folder', ['empty', 'no captions'])
def test_bad_training_data_is_one_error_and_leaves_nothing(env, tmp_path, folder):
    data = tmp_path / 'data'
    if folder == 'empty':
        data.mkdir()
        want = 'it is empty'
    else:
        image_folder(data, captions=False)
        want = '6 images but no captions'
    work = tmp_path / 'W'
    code, out, err = train(env, work, 'data.kind=images', f'data.path={data}',
                           'data.filters=none', 'encoders.ckpt=random', config=README)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: ') and want in last and str(data) in last, err[-3000:]
    assert 'Traceback' not in err
    assert not work.exists()  # not even an empty data/ folder


# ------------------------------------------------------------------------------------------------
# Interrupts and restarts
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_saves_exits_75_and_the_same_command_resumes(env, tmp_path, xla_cache):
    work = tmp_path / 'W'
    args = ('total_steps=200', 'checkpoint.every=1000', f'jax_cache_dir={xla_cache}')
    p, log = start(env, work, *args)
    wait_for(p, log, lambda: len(metric_steps(work)) >= 1)  # the first step is done
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=300) == 75, read(log)[-3000:]
    text = read(log)
    assert 'SIGINT received: saving a checkpoint' in text and 'Traceback' not in text
    assert 'nan' not in text  # the first progress line has no speed yet: '? steps/s'
    assert '| ? steps/s |' in text
    (saved,) = checkpoints(work)  # the step it stopped at, although none was due before 1000
    assert metric_steps(work) == list(range(1, saved + 1))
    # the same command, to a nearer end: resumes from the checkpoint and finishes
    code, out, err = train(env, work, 'total_steps=%d' % (saved + 2), *args[1:])
    assert code == 0, err[-3000:]
    assert f'resumed from step {saved}' in err
    assert metric_steps(work) == list(range(1, saved + 3))


@pytest.mark.slow
def test_ctrl_c_during_the_first_compile_stops_at_once(env, tmp_path):
    work = tmp_path / 'W'
    p, log = start(env, work, 'total_steps=5')  # no compile cache: a compile of ~30 s
    wait_for(p, log, lambda: 'compiling the training step' in read(log))
    time.sleep(3)  # inside XLA's compile (in C++: Python's KeyboardInterrupt waited ~18 s)
    assert p.poll() is None
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=60)
    assert time.time() - t0 < 5, read(log)[-3000:]
    assert code == -signal.SIGINT, read(log)[-3000:]
    assert 'first step (compile + run) took' not in read(log)  # it stopped inside the compile
    assert checkpoints(work) == [] and metric_steps(work) == []


@pytest.mark.slow
def test_metrics_hold_every_step_once_however_a_run_was_killed(env, tmp_path, xla_cache):
    cache = f'jax_cache_dir={xla_cache}'
    # 1. killed (SIGKILL: no handler runs) before any checkpoint, with steps logged:
    #    the restart begins again at step 1 and logs each step once
    work = tmp_path / 'before_any_checkpoint'
    p, log = start(env, work, 'total_steps=1000', 'checkpoint.every=1000', cache)
    wait_for(p, log, lambda: len(metric_steps(work)) >= 2)
    p.kill()
    p.wait()
    assert checkpoints(work) == []
    code, _, err = train(env, work, 'total_steps=4', 'checkpoint.every=1000', cache)
    assert code == 0, err[-3000:]
    assert metric_steps(work) == [1, 2, 3, 4]
    # 2. killed after a checkpoint with later steps logged: those are logged again, once
    work = tmp_path / 'after_a_checkpoint'
    p, log = start(env, work, 'total_steps=1000', 'checkpoint.every=3', cache)
    wait_for(p, log, lambda: checkpoints(work) and max(metric_steps(work) or [0]) > checkpoints(work)[-1])
    p.kill()
    p.wait()
    last = checkpoints(work)[-1]
    code, _, err = train(env, work, f'total_steps={last + 4}', 'checkpoint.every=3', cache)
    assert code == 0, err[-3000:]
    assert f'resumed from step {last}' in err
    assert metric_steps(work) == list(range(1, last + 5))
    # 3. killed right after a checkpoint whose steps were not due for a log line yet: they
    #    reach metrics.jsonl before the checkpoint does, so none goes missing
    work = tmp_path / 'right_after_a_checkpoint'
    p, log = start(env, work, 'total_steps=1000', 'checkpoint.every=3', 'log_every=1000', cache)
    wait_for(p, log, lambda: checkpoints(work))
    p.kill()
    p.wait()
    last = checkpoints(work)[-1]
    assert metric_steps(work)[:last] == list(range(1, last + 1))
    code, _, err = train(env, work, f'total_steps={last + 2}', 'checkpoint.every=3',
                         'log_every=1000', cache)
    assert code == 0, err[-3000:]
    assert metric_steps(work) == list(range(1, last + 3))
