"""`python -m vd_jax.eval fid|clip|fid-stats`: end to end on the tiny random model.

The VD model is `--model tiny` (random weights, 32 px samples) and the FID network a RANDOM
Inception made as tests/test_fid.py makes its reference (torch-fidelity's module with random,
calibrated weights, saved as .pth) and converted by the repository's converter, so the
numbers mean nothing; what is checked is the machinery: the metrics against a direct
computation with the library (FID: the same statistics and distance, 1e-9 relative; CLIP:
the same scorer, 1e-9), the JSON record, resuming (nothing regenerated, identical metrics;
deleted samples regenerated pixel for pixel), determinism per seed across batch sizes, the
reference statistics file, and usage errors before any model loads.
"""
import importlib
import json
import os

import numpy as np
import pytest
import torch

import test_fid  # the random reference Inception of the FID tests
from vd_jax.errors import InputError
from vd_jax.eval.__main__ import main
from vd_jax.eval.fid import (InceptionFeatureExtractor, RunningStatistics, convert_inception,
                             frechet_distance, load_statistics)
from vd_jax.image_io import load_image

ROOT = os.path.join(os.path.dirname(__file__), '..')
PROMPTS = ['a red circle', 'a blue square on white', 'two green triangles']
COMMON = ['--model', 'tiny', '--steps', '2', '--no-compile-cache']


@pytest.fixture(scope='module')
def inception(tmp_path_factory):
    with test_fid._modules({'torch_fidelity': test_fid._package_stub('torch_fidelity')}):
        fidelity = importlib.import_module('torch_fidelity.feature_extractor_inceptionv3')
    d = tmp_path_factory.mktemp('inception')
    torch.save(test_fid._random_reference_state(fidelity), str(d / 'random.pth'))
    return convert_inception(str(d / 'random.pth'), str(d / 'converted'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    (d / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n\n')
    ref = d / 'ref'
    ref.mkdir()
    from PIL import Image
    for i, (h, w) in enumerate([(40, 48), (64, 64), (32, 32), (48, 36)]):
        Image.fromarray(test_fid._images(1, h, w, seed=10 + i)[0]).save(str(ref / f'r{i}.png'))
    (ref / 'notes.txt').write_text('not an image')
    return d


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _only_run(root):
    (run,) = [p for p in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, p))]
    return os.path.join(root, run)


def _pixels(folder, n):
    return np.stack([load_image(os.path.join(folder, 'samples', f'{i:06d}.png')) for i in range(n)])


@pytest.fixture(scope='module')
def fid_run(inception, data, tmp_path_factory):
    """One fid run: 5 samples of the 3 prompts (cycled), seed 0, batches of 2, the reference
    from the image folder, its statistics also saved with --stats-out."""
    d = tmp_path_factory.mktemp('fid')
    out, stats_out = str(d / 'evals'), str(d / 'ref.npz')
    argv = ['fid', *COMMON, '--prompts', str(data / 'prompts.txt'), '--n', '5',
            '--batch-size', '2', '--ref-images', str(data / 'ref'), '--inception', inception,
            '--inception-batch-size', '4', '--out', out]
    code = main(argv + ['--stats-out', stats_out])
    assert code == 0
    run = _only_run(out)
    return dict(argv=argv, out=out, run=run, stats_out=stats_out,
                rec=json.load(open(os.path.join(run, 'metrics.json'))))


@pytest.mark.slow
def test_fid_record_and_value(fid_run, inception, data):
    run, rec = fid_run['run'], fid_run['rec']
    # the record: the metric, every setting, the model and the code version
    assert rec['command'] == 'fid' and rec['task'] == 't2i' and np.isfinite(rec['fid'])
    assert (rec['n'], rec['generated'], rec['reused']) == (5, 5, 0)
    assert rec['generation']['seed'] == 0 and rec['generation']['steps'] == 2
    assert (rec['generation']['height'], rec['generation']['width']) == (32, 32)
    assert rec['model']['source'].startswith('random:tiny') and rec['model']['untrained']
    assert rec['settings']['batch_size'] == 2 and rec['settings']['scale'] == 7.5
    assert rec['code_version'] and rec['jax_version'] and rec['backend'] == 'cpu'
    assert rec['reference']['kind'] == 'images' and rec['reference']['num_images'] == 4
    assert rec['reference']['saved_to'] == os.path.abspath(fid_run['stats_out'])
    assert sorted(os.listdir(os.path.join(run, 'samples'))) == [f'{i:06d}.png' for i in range(5)]
    grid = load_image(os.path.join(run, 'grid.png'))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 5 samples: 2 rows of 3, 2 px padding
    # the FID, recomputed here with the library from the files (reference: fitted to 32 px)
    fx = InceptionFeatureExtractor.from_pretrained(inception, batch_size=4)
    from vd_jax.eval.reference import fit, list_images
    ref = RunningStatistics().update(fx(np.stack([fit(load_image(p), (32, 32))
                                                  for p in list_images(str(data / 'ref'))])))
    samples = RunningStatistics().update(fx(_pixels(run, 5)))
    want = frechet_distance(*samples.mu_sigma(), *ref.mu_sigma())
    print(f"fid {rec['fid']:.6f} (random weights), recomputed {want:.6f}")
    assert rec['fid'] == pytest.approx(want, rel=1e-9)
    mu, sigma = load_statistics(fid_run['stats_out'])
    np.testing.assert_allclose(mu, ref.mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sigma, ref.sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.load(os.path.join(run, 'samples_stats.npz'))['mu'], samples.mu)


@pytest.mark.slow
def test_fid_resume_reuses_samples_and_gives_the_same_fid(fid_run, capsys):
    """An interrupted run (samples 1 and 3 missing): only they are generated, the others'
    files are not touched, the pixels and the FID are those of the uninterrupted run."""
    run, rec = fid_run['run'], fid_run['rec']
    samples = os.path.join(run, 'samples')
    before = _pixels(run, 5)
    for i in (1, 3):
        os.remove(os.path.join(samples, f'{i:06d}.png'))
    kept = {p: os.stat(os.path.join(samples, p)).st_mtime_ns for p in os.listdir(samples)}
    code, stdout, err = _run(fid_run['argv'] + ['--resume', run], capsys)
    assert code == 0, err
    again = json.load(open(os.path.join(run, 'metrics.json')))
    assert (again['generated'], again['reused']) == (2, 3)
    assert '3 of 5 samples already there' in err
    assert 'reusing' in err  # the reference statistics cached in the run folder
    assert {p: os.stat(os.path.join(samples, p)).st_mtime_ns for p in kept} == kept
    np.testing.assert_array_equal(_pixels(run, 5), before)
    assert again['fid'] == rec['fid']
    assert os.listdir(fid_run['out']) == [os.path.basename(run)]  # no new run folder
    assert f"fid = {rec['fid']:.4f}" in stdout


@pytest.mark.slow
def test_fid_stats_command(fid_run, inception, data, tmp_path, capsys):
    """fid-stats of the reference folder at 32 px = the statistics the fid run saved."""
    path = str(tmp_path / 'ref32.npz')
    code, stdout, err = _run(['fid-stats', str(data / 'ref'), path, '--size', '32',
                              '--inception', inception, '--inception-batch-size', '4'], capsys)
    assert code == 0, err
    mu, sigma = load_statistics(path)
    want_mu, want_sigma = load_statistics(fid_run['stats_out'])
    np.testing.assert_array_equal(mu, want_mu)
    np.testing.assert_array_equal(sigma, want_sigma)
    info = json.load(open(path + '.json'))
    assert info['num_images'] == 4 and '32x32' in info['preprocess']
    assert int(np.load(path)['num_images']) == 4
    code, _, err = _run(['fid-stats', str(data / 'ref'), path, '--size', '32',
                         '--inception', inception], capsys)
    assert code == 2 and 'already exists' in err  # never overwritten


@pytest.mark.slow
def test_clip_t2i_and_i2i(fid_run, data, tmp_path, capsys):
    out = str(tmp_path / 'evals')
    code, stdout, err = _run(['clip', *COMMON, '--prompts', str(data / 'prompts.txt'),
                              '--batch-size', '3', '--out', out], capsys)
    assert code == 0, err
    run = _only_run(out)
    rec = json.load(open(os.path.join(run, 'metrics.json')))
    assert rec['task'] == 't2i' and (rec['n'], rec['generated']) == (3, 3)
    assert rec['clip_towers'] == "the model's own"
    # determinism per seed: sample i = prompt i with seed i, whether made in a batch of 3
    # (here) or of 2 (the fid run); float rounding may move a pixel by one level
    a, b = _pixels(run, 3).astype(int), _pixels(fid_run['run'], 3).astype(int)
    diff = np.abs(a - b)
    print(f'batch 3 vs batch 2: {np.count_nonzero(diff)} of {diff.size} values differ, max {diff.max()}')
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size
    # the score, recomputed with the library
    from vd_jax.eval.clip_score import CLIPScorer
    from vd_jax.pipeline import VersatileDiffusion
    vd = VersatileDiffusion.default('tiny')
    p, ctx = vd.params, vd.config['ctx']
    scorer = CLIPScorer(p['ctx_text'], p['ctx_image'], ctx['text'], ctx['image'])
    cos = scorer.clip_score(PROMPTS, list(_pixels(run, 3)), clamp=False)
    assert rec['clip_score_unclamped'] == pytest.approx(float(np.mean(cos)), rel=1e-9)
    assert rec['clip_score'] == pytest.approx(float(np.mean(np.maximum(cos, 0))), abs=1e-12)
    lines = [json.loads(x) for x in open(os.path.join(run, 'scores.jsonl'))]
    assert [x['input'] for x in lines] == PROMPTS
    np.testing.assert_allclose([x['clip_score_unclamped'] for x in lines], cos, rtol=1e-9)

    # i2i: variations of three source images, CLIP image-image similarity with the source
    images = tmp_path / 'images.txt'
    images.write_text('\n'.join(os.path.join(run, 'samples', f'{i:06d}.png') for i in range(3)))
    code, stdout, err = _run(['clip', *COMMON, '--task', 'i2i', '--images', str(images), '--n',
                              '4', '--batch-size', '2', '--out', out], capsys)
    assert code == 0, err
    run2 = [os.path.join(out, p) for p in sorted(os.listdir(out))][-1]
    rec2 = json.load(open(os.path.join(run2, 'metrics.json')))
    assert rec2['task'] == 'i2i' and rec2['n'] == 4
    sources = [load_image(os.path.join(run, 'samples', f'{i % 3:06d}.png')) for i in range(4)]
    sim = scorer.image_similarity(list(_pixels(run2, 4)), sources, clamp=False)
    print(f"image similarity {rec2['clip_image_similarity']:.4f}, unclamped {np.mean(sim):.4f}")
    assert rec2['clip_image_similarity_unclamped'] == pytest.approx(float(np.mean(sim)), rel=1e-9)
    assert load_image(os.path.join(run2, 'grid.png')).shape[1] == 2 + 8 * 34  # source | variation


@pytest.mark.slow
def test_usage_errors_before_any_model(inception, data, tmp_path, capsys, no_model):
    prompts = str(data / 'prompts.txt')
    (tmp_path / 'empty.txt').write_text('\n  \n')
    np.savez(str(tmp_path / 'nomu.npz'), sigma=np.eye(3))
    np.savez(str(tmp_path / 'small.npz'), mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / 'noimages').mkdir()
    (tmp_path / 'run').mkdir()
    (tmp_path / 'list.txt').write_text(str(tmp_path / 'missing.png') + '\n')
    (tmp_path / 'bad_cfg.py').write_text('import ml_collections\n'
                                         'def get_config(arg=None):\n'
                                         '    return ml_collections.ConfigDict({"scael": 3})\n')
    fid = ['fid', *COMMON, '--inception', inception, '--out', str(tmp_path / 'o')]
    cases = [
        (fid + ['--prompts', str(tmp_path / 'nope.txt'), '--ref-images', str(data / 'ref')],
         'does not exist'),
        (fid + ['--prompts', str(tmp_path / 'empty.txt'), '--ref-images', str(data / 'ref')],
         'has no prompts'),
        (fid + ['--prompts', prompts, '--ref-stats', str(tmp_path / 'nomu.npz')], "has no ['mu']"),
        (fid + ['--prompts', prompts, '--ref-stats', str(tmp_path / 'small.npz')],
         'FID Inception statistics are (2048,)'),
        (fid + ['--prompts', prompts], 'exactly one of --ref-images'),
        (fid + ['--prompts', prompts, '--ref-images', str(tmp_path / 'noimages')], 'has no images'),
        (fid + ['--prompts', prompts, '--ref-images', str(tmp_path / 'missing')], 'does not exist'),
        (['fid', *COMMON, '--prompts', prompts, '--ref-images', str(data / 'ref'),
          '--inception', str(tmp_path)], 'has no inception.safetensors'),
        (['fid', *COMMON, '--prompts', prompts, '--ref-images', str(data / 'ref')],
         '--inception is required'),
        (fid + ['--prompts', prompts, '--ref-images', str(data / 'ref'), '--stats-out', 'x.npy'],
         'must end in .npz'),
        (fid + ['--prompts', prompts, '--ref-images', str(data / 'ref'), '--n', '1'],
         'at least 2 samples'),
        (fid + ['--task', 'i2i', '--ref-images', str(data / 'ref')], 'needs --images'),
        (fid + ['--task', 'i2i', '--images', str(tmp_path / 'list.txt'), '--ref-images',
                str(data / 'ref')], 'missing.png'),
        (fid + ['--prompts', prompts, '--ref-images', str(data / 'ref'), '--resume',
                str(tmp_path / 'run')], 'not an evaluation run folder'),
        (['clip', *COMMON, '--prompts', prompts, '--clip', str(tmp_path)], 'not a vd_jax checkpoint'),
        (['clip', *COMMON, '--prompts', prompts, '--steps', '0'], '--steps must be >= 1'),
        (['clip', '--ckpt', str(tmp_path), '--prompts', prompts], 'not a vd_jax checkpoint'),
        (['clip', '--model', 'nope', '--prompts', prompts], 'shipped models'),
        (['clip', '--config', str(tmp_path / 'bad_cfg.py'), '--prompts', prompts],
         "unknown keys ['scael']"),
        (['fid-stats', str(tmp_path / 'noimages'), str(tmp_path / 'a.npz'), '--size', '32',
          '--inception', inception], 'has no images'),
    ]
    for argv, msg in cases:
        code, out, err = _run(argv, capsys)
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith('warning:')]
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (argv, err)
        assert msg in lines[0], (msg, lines[0])
    assert not (tmp_path / 'o').exists()


def test_resume_with_other_settings_is_refused(data, tmp_path, capsys, no_model):
    from vd_jax.eval.generate import GenerationSpec, inputs_digest, write_spec
    run = tmp_path / 'clip-001'
    run.mkdir()
    write_spec(str(run), GenerationSpec('tiny', 't2i', 'ddim', 2, 7.5, 0.0, 0, None, None,
                                        'float32', 3, inputs_digest(PROMPTS)))
    base = ['clip', *COMMON, '--prompts', str(data / 'prompts.txt'), '--resume', str(run)]
    code, _, err = _run(base + ['--scale', '5'], capsys)
    assert code == 2 and 'scale: recorded 7.5, now 5.0' in err
    code, _, err = _run(base + ['--seed', '1'], capsys)
    assert code == 2 and 'seed: recorded 0, now 1' in err


def test_eval_coco_config_gives_the_defaults(data, capsys, no_model):
    """configs/eval_coco.py: the protocol's settings become the defaults, flags override."""
    from vd_jax.eval.__main__ import build_parser
    from vd_jax.eval.checks import apply_config, check
    argv = ['fid', '--config', os.path.join(ROOT, 'configs', 'eval_coco.py'), '--model', 'tiny',
            '--prompts', str(data / 'prompts.txt'), '--ref-images', str(data / 'ref'),
            '--inception', 'unused', '--steps', '3']
    parser = build_parser()
    with pytest.raises(InputError, match="--inception 'unused' does not exist"):
        check(parser.parse_args(argv), parser, argv)
    args = apply_config(parser.parse_args(argv), parser, argv)
    assert (args.n, args.height, args.width, args.sampler, args.scale) == (30000, 512, 512,
                                                                           'ddim', 7.5)
    assert args.steps == 3 and args.batch_size == 16  # the flag wins; the config's default


def test_coco_captions(tmp_path):
    from vd_jax.eval.generate import read_prompts
    ann = {'annotations': [{'image_id': 9, 'id': 5, 'caption': 'A dog\n on a  sofa.'},
                           {'image_id': 2, 'id': 7, 'caption': 'second of image 2'},
                           {'image_id': 2, 'id': 3, 'caption': 'first of image 2'},
                           {'image_id': 9, 'id': 8, 'caption': 'later'}]}
    path = tmp_path / 'captions_val2014.json'
    path.write_text(json.dumps(ann))
    assert read_prompts(str(path)) == ['first of image 2', 'A dog on a sofa.']
