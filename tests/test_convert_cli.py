"""`python -m vd_jax.convert` on things that are not checkpoints, and on output locations that
cannot work: one `error: ...` line naming the file, exit code 2, nothing written."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def run_cli(*args):
    r = subprocess.run([sys.executable, '-m', 'vd_jax.convert', *map(str, args), '--config', 'tiny'],
                       capture_output=True, text=True, env=ENV)
    return r.returncode, r.stdout, r.stderr


def snapshot(root):
    """Every path under root with its size (files) -- to prove nothing was written."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.join(d, n)] = 'dir'
        for n in files:
            out[os.path.join(d, n)] = os.path.getsize(os.path.join(d, n))
    return out


def assert_one_error_line(code, stderr, *needles):
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    # torch's advice to unpickle arbitrary code must never reach the user
    assert 'weights_only' not in stderr and 'Traceback' not in stderr


def _make_sources(d):
    """name -> (path, expected words in the message)."""
    d.mkdir()
    rng = np.random.default_rng(0)
    s = {}

    def put(name, data, *words):
        p = d / name
        p.write_bytes(data)
        s[name] = (p, words)

    put('empty.pth', b'', 'is empty (0 bytes)')
    put('random.pth', rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        'not a PyTorch checkpoint')
    put('notes.pth', b'these are my notes\nnot weights\n', 'is a text file', 'these are my notes')
    put('lfs.pth', b'version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n',
        'Git LFS pointer')
    full = d / 'full.pth'
    torch.save({'w': torch.zeros(64, 64)}, full)
    blob = full.read_bytes()
    full.unlink()
    put('truncated.pth', blob[: len(blob) // 2], 'truncated', 'cut short')
    zpath = d / 'archive.pth'
    with zipfile.ZipFile(zpath, 'w') as z:
        z.writestr('readme.txt', 'hello')
    s['archive.pth'] = (zpath, ('zip archive but not a PyTorch checkpoint',))
    # a real torch.save file with a non-tensor object: the safe loader refuses it
    obj = d / 'objects.pth'
    torch.save({'w': torch.zeros(2), 'step': np.float64(3.0)}, obj)
    s['objects.pth'] = (obj, ('Python objects besides tensors', 'numpy'))
    (d / 'empty_folder').mkdir()
    s['empty_folder'] = (d / 'empty_folder', ('not a checkpoint vd_jax knows', 'it is empty'))
    (d / 'photos').mkdir()
    (d / 'photos' / 'cat.jpg').write_bytes(b'x')
    s['photos'] = (d / 'photos', ('not a checkpoint vd_jax knows', 'cat.jpg', 'diffusers'))
    (d / 'badcfg').mkdir()
    (d / 'badcfg' / 'config.json').write_text('{"_class_name": ')
    s['badcfg'] = (d / 'badcfg', ('config.json', 'as JSON'))
    return s


@pytest.mark.slow
def test_non_checkpoints_get_one_clear_line(tmp_path):
    sources = _make_sources(tmp_path / 'src')
    before = snapshot(tmp_path)
    for name, (path, words) in sources.items():
        code, _, err = run_cli(path, tmp_path / f'out_{name}')
        assert_one_error_line(code, err, str(path), *words)
    assert snapshot(tmp_path) == before  # no output, no temporary folder


@pytest.mark.slow
def test_bad_output_locations_are_refused_before_reading(tmp_path):
    # the source is random bytes: were it read first, the error would be about the source
    src = tmp_path / 'random.pth'
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 1024, dtype=np.uint8).tobytes())
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('keep me')
    done = tmp_path / 'converted'
    done.mkdir()
    (done / 'manifest.json').write_text(json.dumps({'format': 'vd_jax checkpoint v1'}))
    photos = tmp_path / 'photos'
    photos.mkdir()
    (photos / 'cat.jpg').write_bytes(b'precious')
    before = snapshot(tmp_path)
    cases = [
        ((a_file,), ('notes.txt', 'is an existing file')),
        ((a_file, '--overwrite'), ('notes.txt', 'is an existing file')),
        ((done,), ("'" + str(done) + "' already exists", '--overwrite')),
        ((photos, '--overwrite'), ('photos', 'not a vd_jax checkpoint', 'refused')),
        ((a_file / 'sub' / 'out',), ('notes.txt', 'is a file, not a folder')),
    ]
    for args, words in cases:
        code, _, err = run_cli(src, *args)
        assert_one_error_line(code, err, *words)
        assert 'random.pth' not in err
    assert snapshot(tmp_path) == before
    assert a_file.read_text() == 'keep me' and (photos / 'cat.jpg').read_bytes() == b'precious'
    # a path whose parent folders do not exist yet is fine (they are created on writing): the
    # run gets to the source, which is refused, and leaves nothing behind
    code, _, err = run_cli(src, tmp_path / 'new' / 'deeper' / 'out')
    assert_one_error_line(code, err, 'random.pth', 'not a PyTorch checkpoint')
    assert snapshot(tmp_path) == before
    # a missing source is a usage error too
    code, _, err = run_cli(tmp_path / 'nowhere.pth', tmp_path / 'out')
    assert_one_error_line(code, err, 'nowhere.pth', 'does not exist')


def test_unwritable_output_location(tmp_path, monkeypatch, capsys):
    # Tests run as root here, where permission bits do not bind: the CLI's own main() with the
    # permission check answering "no" for that folder (everything else is real).
    from vd_jax.convert.__main__ import main
    locked = tmp_path / 'locked'
    locked.mkdir()
    src = tmp_path / 'random.pth'
    src.write_bytes(b'\x00' * 64)
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, m: False if os.fspath(p) == str(locked)
                        else real_access(p, m))
    assert main([str(src), str(locked / 'new' / 'out'), '--config', 'tiny']) == 2
    err = capsys.readouterr().err
    assert_one_error_line(2, err, 'no permission to write', str(locked))
    assert os.listdir(locked) == []


def test_real_checkpoint_files_still_open(tmp_path):
    """The sniffing in front of torch.load lets every real format through: zip (memory-mapped),
    the pre-1.6 legacy pickle (with a warning), and safetensors whatever the file is called."""
    from safetensors.numpy import save_file
    from vd_jax.convert.sources import SafetensorsSource, TorchFileSource, open_source
    sd = {'a.weight': torch.arange(6.).reshape(2, 3), 'b.bias': torch.ones(4, dtype=torch.float16)}
    torch.save(sd, tmp_path / 'zip.pth')
    torch.save(sd, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / 'named.bin'))
    for name, cls in (('zip.pth', TorchFileSource), ('legacy.pth', TorchFileSource),
                      ('named.bin', SafetensorsSource)):
        if name == 'legacy.pth':
            with pytest.warns(UserWarning, match='legacy torch format'):
                src = open_source(str(tmp_path / name))
        else:
            src = open_source(str(tmp_path / name))
        assert isinstance(src, cls) and sorted(src.keys()) == sorted(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(src.get(k), v.numpy())
            assert src.shape(k) == tuple(v.shape)


@pytest.mark.slow
def test_progress_off_a_terminal_is_whole_lines_without_carriage_returns(tmp_path):
    """stderr into a pipe (a log file): the converter's progress is the command lines' line
    display (`vd_jax.outputs.progress_bar`), not carriage-return updates piling up in one line."""
    from safetensors.numpy import save_file
    from vd_jax.components import Components
    from vd_jax.config import load_config
    from vd_jax.convert import export_part
    from vd_jax.models.init import random_params
    cfg = load_config('tiny')['model']
    params = random_params(Components(cfg, {}).abstract_params(['vae_image'])['vae_image'])
    sd = {k: np.asarray(v) for k, v in export_part(params, cfg, 'vae_image', 'vd-v1.0').items()}
    save_file(sd, str(tmp_path / 'vae.safetensors'))
    # bytes: text mode would turn every carriage return into a newline
    r = subprocess.run([sys.executable, '-m', 'vd_jax.convert', str(tmp_path / 'vae.safetensors'),
                        str(tmp_path / 'ckpt'), '--config', 'tiny'], capture_output=True, env=ENV)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert '\r' not in err and '\x1b' not in err, repr(err[-500:])
    lines = err.splitlines()
    assert f'converting vae_image: {len(sd)}/{len(sd)} tensors (100%)' in '\n'.join(lines), err
    assert max(map(len, lines)) < 200, err
    assert out.strip() == f"wrote {tmp_path / 'ckpt'}"
