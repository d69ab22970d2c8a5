"""A newcomer's mistakes at the command lines: every one gets one clear `error: ...` line and
exit code 2 before any model loads, nothing is written, and the exit codes are the same (and
documented in --help) for sample.py, train.py and python -m vd_jax.convert / export / eval.
The runs that do sample check what the user sees: step-grid notes, warnings on lines of their
own, progress that reaches 100%, no terminal escape codes in a log, the I2T2I record.

The real scripts run in subprocesses; the bigger matrix of sample.py mistakes runs its `main`
in-process with model loading replaced by a failure, which proves nothing loads first.
"""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vd_jax import sample_cli
from vd_jax.errors import InputError
from vd_jax.pipeline import VersatileDiffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ' '.join(['dog'] * 90)  # 90 BPE tokens: CLIP keeps 75


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """Offline, CPU, and the compile cache in a temporary folder (not the user's ~/.cache)."""
    return dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
                XDG_CACHE_HOME=str(tmp_path_factory.mktemp('cache')))


def run(env, *args, module=None, timeout=600):
    cmd = [sys.executable] + (['-m', module] if module else [os.path.join(ROOT, args[0])])
    cmd += [str(a) for a in (args if module else args[1:])]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr, time.time() - t0


def sample(env, *args, **kw):
    return run(env, 'sample.py', *args, **kw)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('inputs')
    rng = np.random.default_rng(0)
    for name in ('cat.png', 'dog.png'):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(d / name)
    (d / 'notes.png').write_text('not an image')
    (d / 'a_file').write_text('x')
    (d / 'binary.txt').write_bytes(b'\xff\xfe\x00bad')
    (d / 'list.txt').write_text(f"{d / 'cat.png'}\n{d / 'missing.png'}\n")
    (d / 'empty.txt').write_text('\n')
    return d


def assert_usage_error(code, stderr, *needles):
    """Exit 2, the last line is the one error line, and no model was loaded."""
    assert code == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith('error: '), stderr
    assert sum(line.startswith('error: ') for line in lines) == 1, stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    assert 'Traceback' not in stderr and 'loaded ' not in stderr and 'UNTRAINED' not in stderr


# ------------------------------------------------------------------------------------------------
# sample.py: mistakes are reported before any model loads, nothing is written
# ------------------------------------------------------------------------------------------------

def cases(d):
    img, cat, dog = str(d / 'cat.png'), d / 'cat.png', d / 'dog.png'
    return {
        # inputs
        'missing image': (['--task', 'i2i', '--image', d / 'nope.png'], ['--image', 'nope.png',
                                                                         'does not exist']),
        'unreadable image': (['--task', 'i2t', '--image', d / 'notes.png'],
                             ['--image', 'notes.png', 'not an image']),
        'image is a folder': (['--task', 'i2i', '--image', d], ['is a folder']),
        'missing entry of --images': (['--task', 'i2i', '--images', d / 'list.txt'],
                                      ["--images '", 'list.txt', 'missing.png', 'does not exist']),
        'binary --images': (['--task', 'i2i', '--images', d / 'binary.txt'],
                            ['binary.txt', 'not a UTF-8 text file']),
        'empty --prompts': (['--prompts', d / 'empty.txt'], ['empty.txt', 'is empty']),
        'missing --prompts': (['--prompts', d / 'nope.txt'], ['nope.txt', 'does not exist']),
        'unreadable mask': (['--task', 'multi', '--image', cat, '--mask', d / 'notes.png'],
                            ['--mask', 'notes.png']),
        'mask count': (['--task', 'multi', '--image', cat, '--image', dog, '--mask', img],
                       ['1 --mask for 2 --image']),
        # a task without its required input
        'i2t without image': (['--task', 'i2t'], ['--task i2t needs an input image']),
        't2t without prompt': (['--task', 't2t'], ['--task t2t needs a prompt']),
        'explicit t2i without prompt': (['--task', 't2i'], ['--task t2i needs a prompt']),
        'checkpoint without prompt': (['--ckpt', d], ['--task t2i needs a prompt']),
        't2i given only an image': (['--image', img], ['--task t2i needs a prompt']),
        # meaningless values
        'negative scale': (['--scale', '-1'], ['--scale', 'must be >= 0']),
        'negative seed': (['--seed', '-3'], ['--seed', 'seed must be an integer in [0, 2^32)']),
        'n 0': (['--n', '0'], ['--n', 'n (samples per input) must be an integer >= 1, got 0']),
        'negative eta': (['--eta', '-0.5'], ['--eta', 'eta must be >= 0']),
        'batch size 0': (['--batch-size', '0'], ['--batch-size', '>= 1']),
        'focus': (['--task', 'i2i', '--image', img, '--focus', '2'], ['--focus', '[0, 1]']),
        'float16': (['--dtype', 'float16'], ["dtype must be 'float32' or 'bfloat16', got 'float16'"]),
        # steps: errors name the sampler actually chosen (the default, ddim, too)
        'steps 0': (['--steps', '0'], ['--sampler ddim --steps 0', 'ddim: steps must be']),
        'ddpm 2000': (['--sampler', 'ddpm', '--steps', '2000'], ['--sampler ddpm', 'ddpm: steps']),
        # the Karras grid and guidance rescale: the Python API's messages, named by their flag
        'karras with ddim': (['--karras'], ['--karras', "is for the samplers ('dpm++',), not 'ddim'"]),
        'negative guidance rescale': (['--guidance-rescale', '-0.2'],
                                      ['--guidance-rescale', 'must be in [0, 1]', 'got -0.2']),
        # the output location
        'out is a file': (['--out', d / 'a_file'], ["--out '", "a_file' is a file, not a folder"]),
        'out under a file': (['--out', d / 'a_file' / 'sub'],
                             ["cannot create --out '", "a_file' is a file, not a folder"]),
        # the model
        'not a checkpoint': (['--ckpt', d, '--prompt', 'x'], ['not a vd_jax checkpoint folder']),
        'two models': (['--model', 'tiny', '--config', 'tiny', '--prompt', 'x'], ['one of']),
        'unknown model': (['--model', 'huge', '--prompt', 'x'], ["--model 'huge'"]),
    }


def test_every_mistake_is_reported_before_any_model_loads(files, tmp_path, capsys, no_model):
    for name, (argv, needles) in cases(files).items():
        out = tmp_path / name.replace(' ', '_')
        argv = [str(a) for a in argv]
        argv += [] if '--out' in argv else ['--out', str(out)]
        assert sample_cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert_usage_error(2, err, *needles)
        assert not out.exists(), name  # no run folder, not even the output root


def test_an_unwritable_out_is_refused(files, tmp_path, capsys, monkeypatch, no_model):
    # tests run as root, who may write anywhere: simulate a read-only folder
    real = os.access
    ro = str(tmp_path / 'readonly')
    os.mkdir(ro)
    monkeypatch.setattr(os, 'access', lambda p, m, *a, **k:
                        False if os.path.abspath(p) == ro and m & os.W_OK else real(p, m, *a, **k))
    assert sample_cli.main(['--prompt', 'x', '--out', ro]) == 2
    assert_usage_error(2, capsys.readouterr().err, f"--out '{ro}' is not writable")
    assert sample_cli.main(['--prompt', 'x', '--out', os.path.join(ro, 'new')]) == 2
    assert_usage_error(2, capsys.readouterr().err, 'cannot create --out', f"no permission to write "
                       f"in '{ro}'")
    assert os.listdir(ro) == []


def test_ignored_flags_are_warnings_and_the_demo_prompt_is_for_a_plain_run(files, capsys, no_model):
    a_file = str(files / 'a_file')
    # a flag the task ignores: one warning line, then the run goes on (here: to the --out error)
    assert sample_cli.main(['--task', 'i2t', '--image', str(files / 'cat.png'), '--prompt', 'x',
                            '--out', a_file]) == 2
    err = capsys.readouterr().err
    assert 'warning: --prompt is ignored by --task i2t' in err.splitlines()
    assert_usage_error(2, err, '--out')
    assert sample_cli.main(['--prompt', 'x', '--image', str(files / 'cat.png'), '--out', a_file]) == 2
    assert 'warning: --image is ignored by --task t2i' in capsys.readouterr().err.splitlines()
    # plain `python sample.py` (maybe with a shipped model) announces the demo prompt
    assert sample_cli.main(['--model', 'tiny', '--out', a_file]) == 2
    err = capsys.readouterr().err
    assert err.startswith('no --prompt given: using the demo prompt') and '--out' in err


@pytest.mark.slow
def test_sample_py_mistakes_in_a_subprocess(env, files, tmp_path):
    out = tmp_path / 'out'
    for argv, needles in (
            (['--task', 'i2i', '--image', files / 'nope.png'], ['does not exist']),
            (['--out', files / 'a_file' / 'sub'], ['cannot create --out', 'is a file']),
            (['--task', 'multi', '--image', files / 'cat.png', '--mask', 'none', '--mask', 'none'],
             ['2 --mask for 1 --image'])):
        code, _, err, seconds = sample(env, *argv, *([] if '--out' in argv else ['--out', out]))
        assert_usage_error(code, err, *needles)
        assert not out.exists()


@pytest.mark.slow
def test_step_counts_the_original_grid_lacks_are_accepted_before_loading(env, files, tmp_path):
    # dpm++ with 1000 steps: a note names the grid, and the only error is the --out one
    code, _, err, _ = sample(env, '--sampler', 'dpm++', '--steps', '1000', '--prompt', 'x',
                             '--out', files / 'a_file')
    assert_usage_error(code, err, '--out')
    assert "note: dpm++: steps=1000 runs every timestep (spacing='full'" in err


# ------------------------------------------------------------------------------------------------
# sample.py runs: what a user reads
# ------------------------------------------------------------------------------------------------

def assert_clean_log(err):
    """stderr is not a terminal here: whole lines only, no carriage returns or escape codes."""
    assert '\r' not in err and '\x1b' not in err, repr(err[-2000:])
    for line in err.splitlines():
        assert 'warning:' not in line or line.startswith('warning:'), line  # never glued


@pytest.mark.slow
def test_ddpm_with_3_steps_runs_and_long_prompts_warn_once_by_their_index(env, tmp_path):
    out = tmp_path / 'out'
    code, stdout, err, _ = sample(env, '--model', 'tiny', '--sampler', 'ddpm', '--steps', '3',
                                  '--prompt', 'a cat', '--prompt', LONG, '--n', '2',
                                  '--batch-size', '3', '--out', out)
    assert code == 0, err[-3000:]
    notes = [line for line in err.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and notes[0].startswith('note: ddpm:') and "'leading' grid" in notes[0]
    # the user's prompt 1, once, although the batches hold it twice at positions 2 and 0
    warned = [line for line in err.splitlines() if 'BPE tokens' in line]
    assert len(warned) == 1 and warned[0].startswith('warning: prompt 1 has 90 BPE tokens'), err
    assert_clean_log(err)
    # two batches of 3 steps each: the last progress line is complete
    progress = [line for line in err.splitlines() if re.match(r't2i batch \d/\d: ', line)]
    assert progress[-1].startswith('t2i batch 2/2: 6/6 steps (100%)'), err
    assert len(os.listdir(out / 'run-001')) == 4 + 2  # PNGs, grid, settings


@pytest.mark.slow
def test_i2t2i_progress_reaches_100_and_texts_record_the_input_image(env, files, tmp_path):
    out, image = tmp_path / 'out', str(files / 'cat.png')
    code, _, err, _ = sample(env, '--model', 'tiny', '--task', 'i2t2i', '--image', image,
                             '--steps', '2', '--n', '2', '--positive', LONG, '--out', out)
    assert code == 0, err[-3000:]
    assert_clean_log(err)
    # two denoising runs of 2 steps (image -> text, then text+image -> image)
    assert [line for line in err.splitlines() if line.startswith('i2t2i: ')][-1].startswith(
        'i2t2i: 4/4 steps (100%)'), err
    # the user's --positive is named; the model's own sentences are not "prompts"
    warned = [line for line in err.splitlines() if 'BPE tokens' in line]
    assert warned == [w for w in warned if w.startswith('warning: --positive has 90 BPE')], err
    assert len(warned) == 1
    texts = json.loads((out / 'run-001' / 'texts.json').read_text())
    assert [t['input'] for t in texts] == [image, image]
    assert json.loads((out / 'run-001' / 'settings.json').read_text())['image_files'] == [image]


# ------------------------------------------------------------------------------------------------
# The Python API says what the command line says
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def vd():
    return VersatileDiffusion.random('tiny', seed=0)


@pytest.mark.slow
def test_n_0_is_the_first_thing_every_task_checks(vd, monkeypatch, capsys, files, no_model):
    def nothing_else(*a, **k):
        raise AssertionError('work done before n was checked')
    comps = vd.components
    for name in ('encode_context', 'encode_latent', 'decode_latent', 'uncond_context'):
        monkeypatch.setattr(comps, name, nothing_else)
    img = np.zeros((8, 8, 3), np.float32)
    calls = {'text_to_image': ('a cat',), 'image_variation': (img,), 'image_to_text': (img,),
             'text_variation': ('a cat',), 'dual_guided': ('a cat', img),
             'multi_context': ([img],), 'disentangle': (img,), 'i2t2i': (img,)}
    msg = 'n (samples per input) must be an integer >= 1, got 0'
    for method, args in calls.items():
        with pytest.raises(InputError, match=re.escape(msg)):
            getattr(vd, method)(*args, n=0)
    assert sample_cli.main(['--prompt', 'x', '--n', '0']) == 2
    assert msg in capsys.readouterr().err


def test_float16_is_rejected_with_the_command_lines_message(vd, capsys, no_model):
    msg = "dtype must be 'float32' or 'bfloat16', got 'float16'"
    with pytest.raises(InputError, match=re.escape(msg)):
        vd.text_to_image('a cat', dtype='float16')
    with pytest.raises(ValueError, match=re.escape(msg)):
        VersatileDiffusion(vd.config, {}, dtype='float16')
    assert sample_cli.main(['--prompt', 'x', '--dtype', 'float16']) == 2
    assert msg in capsys.readouterr().err


def test_a_long_prompt_repeated_n_times_warns_once_with_the_users_index(vd):
    import warnings

    from vd_jax.tasks.contexts import text_contexts
    from vd_jax.tokenizers import PromptTruncatedWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        c = text_contexts(vd.components, ['a cat', LONG, 'a dog'], 4)
    got = [str(w.message) for w in caught if w.category is PromptTruncatedWarning]
    assert len(got) == 1 and got[0].startswith('prompt 1 has 90 BPE tokens'), got
    assert c.shape[0] == 12
    np.testing.assert_array_equal(c[4], c[7])  # prompt-major repetition, as before
    # the tokenizer itself: a prompt repeated in one call is reported once, at its first index
    tok = vd.components.tokenizer('clip')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        tok(['short', LONG, LONG, 'other'])
    assert [str(w.message)[:8] for w in caught] == ['prompt 1']


# ------------------------------------------------------------------------------------------------
# One exit-code convention, documented in every --help
# ------------------------------------------------------------------------------------------------

CLIS = {
    'sample.py': dict(script='sample.py', bad=['--steps', '0']),
    'train.py': dict(script='train.py', bad=['--config', 'configs/train_tiny.py', '--workdir',
                                             '{tmp}/w', 'optimizer.lrr=1']),
    'vd_jax.convert': dict(module='vd_jax.convert', bad=['{tmp}/nope.pth', '{tmp}/out']),
    'vd_jax.export': dict(module='vd_jax.export', bad=['{tmp}/nope', '{tmp}/out.safetensors']),
    'vd_jax.eval': dict(module='vd_jax.eval', bad=['shapes', '--steps', '0', '--out', '{tmp}/e']),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CLIS))
def test_every_cli_documents_and_uses_exit_code_2_for_usage_errors(name, env, tmp_path):
    c = CLIS[name]

    def call(*args):
        if 'module' in c:
            return run(env, *args, module=c['module'])
        return run(env, c['script'], *args)
    code, out, err, _ = call('--help')
    assert code == 0, err
    text = ' '.join(out.split())  # argparse re-wraps nothing in raw epilogs, but be safe
    assert 'exit codes (the same for every vd_jax command):' in text
    assert "2 usage error: a flag, input file or output location that cannot be used" in text
    assert '1 an unexpected failure' in text
    if name == 'train.py':
        assert '75 stopped by SIGTERM or Ctrl-C after saving a checkpoint' in text
        assert '3 training diverged' in text
    code, out, err, _ = call(*[a.format(tmp=tmp_path) for a in c['bad']])
    assert code == 2, (name, err[-2000:])
    assert err.strip().splitlines()[-1].startswith('error: '), err
    assert 'Traceback' not in err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.slow
def test_train_py_refuses_a_workdir_it_cannot_create(env, files):
    code, _, err, _ = run(env, 'train.py', '--config', 'configs/train_tiny.py:test', '--workdir',
                          files / 'a_file' / 'w')
    assert_usage_error(code, err, "cannot create --workdir '", "a_file' is a file, not a folder")
    code, _, err, _ = run(env, 'train.py', '--config', 'configs/train_tiny.py:test', '--workdir',
                          files / 'a_file')
    assert_usage_error(code, err, "--workdir '", "a_file' is a file, not a folder")


def test_export_refuses_an_output_under_a_file_before_reading(env, files, tmp_path):
    from vd_jax.checkpoint import write_checkpoint
    from vd_jax.config import load_config
    ckpt = tmp_path / 'ckpt'
    write_checkpoint(str(ckpt), load_config('tiny').model, {'vae_text': {'w': np.zeros((2,))}},
                     manifest={})
    code, out, err, _ = run(env, str(ckpt), str(files / 'a_file' / 'x.safetensors'),
                            module='vd_jax.export')
    assert_usage_error(code, err, "cannot create output '", "a_file' is a file, not a folder")
    assert 'exporting' not in out + err


def on_a_terminal(env, *args):
    """Run sample.py with stderr a 100-column terminal; (exit code, what the terminal got)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
    try:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'sample.py'), *map(str, args)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = p.wait(timeout=600)
    finally:
        os.close(master)
    return code, b''.join(chunks).decode()


@pytest.mark.slow
def test_on_a_terminal_warnings_and_errors_are_never_glued_to_the_progress_bar(env, tmp_path):
    # a warning during a run: on a line of its own, not behind the bar's text
    code, err = on_a_terminal(env, '--model', 'tiny', '--prompt', LONG, '--steps', '1', '--n', '1',
                              '--out', tmp_path / 'out')
    assert code == 0, err[-2000:]
    assert '%|' in err  # tqdm drew its bar
    segments = re.split('[\r\n]', err)  # tqdm redraws its line after '\r'
    warned = [x for x in segments if 'BPE tokens' in x]
    assert warned and all(x.startswith('warning: prompt 0 has 90 BPE tokens') for x in warned), err
    # an error found mid-run (a size the model cannot make): after the bar closed its line
    code, err = on_a_terminal(env, '--model', 'tiny', '--prompt', 'a cat', '--height', '30',
                              '--steps', '2', '--out', tmp_path / 'out2')
    assert code == 2, err[-2000:]
    assert '%|' in err or 'step [' in err, err
    before, _, after = err.rpartition('error: ')
    assert before.endswith('\n'), repr(err[-600:])  # (a pty turns '\n' into '\r\n')
    assert 'multiples of' in after and not (tmp_path / 'out2').exists()
