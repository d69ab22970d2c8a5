"""FID: the InceptionV3 features, the converter of the FID weights, statistics and the distance.

References (real third-party code, installed with `pip install --no-deps` because both
packages declare torchvision, which does not import beside the pinned torch CPU build):
  * network: torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` (the FID InceptionV3 that
    torchmetrics also uses; same state-dict names as pytorch-fid's weights file), loaded from
    its own module file without running `torch_fidelity/__init__.py` (which imports
    torchvision for its datasets);
  * input handling: pytorch-fid's `InceptionV3.forward` lines (`F.interpolate(bilinear,
    align_corners=False)`, `2 * x - 1`) on torchvision-`ToTensor` input, run in torch;
  * the distance and the statistics file reader: pytorch-fid 0.3.0's
    `calculate_frechet_distance` and `_compute_statistics_of_path`, imported with an empty
    stand-in for the torchvision names its modules reference at import time (no torchvision
    code runs in the functions used).

The reference network gets RANDOM weights (conv kernels from torch's default init, BatchNorm
affine parameters drawn at random and running statistics calibrated on a batch so that
activations stay O(1) through the 94 layers); its state dict is saved to a `.pth` and
converted by `convert_inception`, so parity holds THROUGH the converter. Tolerances and
measurements (features of magnitude ~0.6 mean, ~7 max, like the real network's):
  * features, fp32 on both sides: 1e-4 max abs; measured 6e-5. That is the float32 noise
    this 94-layer random network amplifies: torch fp32 against torch fp64 differs by 5e-5;
  * features, fp64 on both sides: 1e-6; measured 2e-7, the float32 rounding of
    torch-fidelity's output (layer by layer the two agree to 1e-12);
  * resize + scaling against F.interpolate: 1e-5; measured 0 (bit-exact);
  * distance: 1e-6 relative; measured 1e-14 on regular statistics, 5e-9 on rank-deficient
    ones (where scipy's sqrtm of a singular product is itself only that accurate).
"""
import contextlib
import copy
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vd_jax.checkpoint import flatten
from vd_jax.convert import plan_conversion
from vd_jax.convert.sources import ShapeSource
from vd_jax.errors import CheckpointError, InputError
from vd_jax.eval.fid import (InceptionFeatureExtractor, RunningStatistics, convert_inception,
                             fid_from_statistics, frechet_distance, load_inception_params,
                             load_statistics, save_statistics)
from vd_jax.models.inception import (FID_INPUT_SIZE, InceptionConfig, InceptionV3,
                                     abstract_params, preprocess, resize_bilinear)

FEATURE_TOL = 1e-4
RESIZE_TOL = 1e-5
FID_RTOL = 1e-6
INSTALL_HINT = 'pip install --no-deps -r tests/requirements-nodeps.txt'


# ----------------------------------------------------------------------------------------
# Loading the third-party references
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _modules(stubs):
    """Temporarily put stub modules into sys.modules; remove them and every module imported
    under their names afterwards (the loaded third-party modules keep working)."""
    before = set(sys.modules)
    for name, mod in stubs.items():
        if name in sys.modules:
            raise RuntimeError(f'{name} is already imported; cannot stand in for it')
        sys.modules[name] = mod
    try:
        yield
    finally:
        roots = tuple(stubs)
        for name in set(sys.modules) - before | set(stubs):
            if name.startswith(roots):
                sys.modules.pop(name, None)


def _package_stub(name):
    """The installed package `name` as an empty namespace over its folder: its sub-modules
    import from the real files, its __init__ is not run."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f'{name} is not installed: {INSTALL_HINT}')
    mod = types.ModuleType(name)
    mod.__path__ = list(spec.submodule_search_locations)
    return mod


@pytest.fixture(scope='module')
def fidelity():
    """torch-fidelity's feature_extractor_inceptionv3 module (imports only torch and
    torch_fidelity's helpers/base/interpolation modules)."""
    with _modules({'torch_fidelity': _package_stub('torch_fidelity')}):
        return importlib.import_module('torch_fidelity.feature_extractor_inceptionv3')


@pytest.fixture(scope='module')
def pytorch_fid():
    """pytorch-fid's fid_score module. Its imports touch torchvision only for names used by
    the image-folder CLI and the network builder (`torchvision.transforms`, the base classes
    `torchvision.models.inception.Inception{A,C,E}`); they get empty stand-ins."""
    if importlib.util.find_spec('pytorch_fid') is None:
        raise RuntimeError(f'pytorch-fid is not installed: {INSTALL_HINT}')
    tv = types.ModuleType('torchvision')
    tv.__version__ = '0.0'
    tv.transforms = types.ModuleType('torchvision.transforms')
    tv.models = types.ModuleType('torchvision.models')
    tv.models.inception = types.ModuleType('torchvision.models.inception')
    for cls in ('InceptionA', 'InceptionC', 'InceptionE'):
        setattr(tv.models.inception, cls, type(cls, (torch.nn.Module,), {}))
    stubs = {'torchvision': tv, 'torchvision.transforms': tv.transforms,
             'torchvision.models': tv.models, 'torchvision.models.inception': tv.models.inception}
    with _modules(stubs):
        sys.modules.pop('pytorch_fid.fid_score', None)
        return importlib.import_module('pytorch_fid.fid_score')


def _random_reference_state(fidelity, seed=0):
    """torch-fidelity's network built without weights, then given random ones: BatchNorm
    weight ~ U(0.3, 0.9), bias ~ N(0, 0.2), running statistics = those of a calibration batch
    (train-mode forward with cumulative averaging) of photo-like images, so activations
    stay O(1) on the test images."""
    cls = fidelity.FeatureExtractorInceptionV3
    torch.manual_seed(seed)
    # construct without loading (the constructor would download the real weights)
    with mock.patch.object(cls, 'load_state_dict', lambda self, sd, strict=True: None), \
            mock.patch.object(fidelity, 'load_state_dict_from_url', lambda *a, **k: {}):
        model = cls('inception-v3-compat', ['2048'])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.3 + 0.6 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.momentum = None  # cumulative average: running stats = the batch's stats
                m.reset_running_stats()
        model.train()
        calib = _images(2, FID_INPUT_SIZE, FID_INPUT_SIZE, seed=seed + 100)
        model(torch.from_numpy(calib.transpose(0, 3, 1, 2).copy()))
    return model.eval().state_dict()


@pytest.fixture(scope='module')
def ref(fidelity, tmp_path_factory):
    """A random FID network saved as .pth, reloaded by torch-fidelity's own (strict) loader,
    and converted by our converter."""
    d = tmp_path_factory.mktemp('inception')
    pth = str(d / 'random-inception.pth')
    torch.save(_random_reference_state(fidelity), pth)
    model = fidelity.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                                 feature_extractor_weights_path=pth)
    out = convert_inception(pth, str(d / 'converted'))
    return dict(model=model, pth=pth, converted=out)


def _images(n, h, w, seed):
    """Photo-like uint8 images: smooth colour fields, edges and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, 3)
        img = 0.5 + 0.4 * np.stack([np.sin(f[0] * x + f[1] * y), np.cos(f[1] * x * y * 3),
                                    np.sin(f[2] * (x - y))], -1)
        img[(x - rng.uniform()) ** 2 + (y - rng.uniform()) ** 2 < 0.05] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.08, img.shape)
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


def _max(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# Network parity through the converter
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fx(ref):
    """One extractor for the tests below, so each (size, batch) compiles once."""
    return InceptionFeatureExtractor.from_pretrained(ref['converted'], batch_size=2)


@pytest.mark.slow
def test_features_parity_through_converter(ref, fx):
    """torch-fidelity's forward on uint8 299x299 images (its TF1 resize is the identity at
    299; it normalises by (x - 128) / 128) against our extractor on the float images x / 256,
    which pytorch-fid's 2x - 1 maps to exactly (x - 128) / 128. Three images, batch size 2:
    the padded last batch is exercised."""
    u8 = _images(3, FID_INPUT_SIZE, FID_INPUT_SIZE, seed=0)
    with torch.no_grad():
        want = ref['model'](torch.from_numpy(u8.transpose(0, 3, 1, 2).copy()))[0].numpy()
    t0 = time.time()
    got = fx(u8.astype(np.float32) / 256)
    print(f'features (3 images, compile + run): {time.time() - t0:.1f}s')
    err = _max(got, want)
    print(f'features max abs error {err:.3g}, feature magnitude max {np.abs(want).max():.3g}, '
          f'mean {np.abs(want).mean():.3g}')
    assert got.shape == (3, 2048) and got.dtype == np.float32
    assert np.abs(want).mean() > 0.05 and np.std(want) > 0.05  # not a degenerate network
    assert err < FEATURE_TOL, err
    # the three images give different features (the batch is not mixed up)
    assert _max(got[0], got[1]) > 100 * FEATURE_TOL


@pytest.mark.slow
def test_features_parity_float64(ref, fx):
    """The same comparison in float64 on both sides, which removes the float32 rounding that
    this deep random network amplifies (torch fp32 vs torch fp64 differ by ~5e-5): what is
    left is the implementation. torch-fidelity returns its features cast to float32 (and its
    'float64' option maps to float32), so the reference is a float64 copy of its module
    whose output is rounded to float32: tolerance 1e-6 (measured ~2e-7 = that rounding)."""
    model = copy.deepcopy(ref['model'])
    model.feature_extractor_internal_dtype = torch.float64
    model.double()
    u8 = _images(1, FID_INPUT_SIZE, FID_INPUT_SIZE, seed=1)
    with torch.no_grad():
        want = model(torch.from_numpy(u8.transpose(0, 3, 1, 2).copy()))[0].numpy()
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), fx.params)
        net = InceptionV3(dtype=jnp.float64, param_dtype=jnp.float64)
        got = np.asarray(jax.jit(net.apply)({'params': params}, u8.astype(np.float64) / 256))
    assert got.dtype == np.float64
    err = _max(got, want)
    print(f'float64 features max abs error {err:.3g} (max |feature| {np.abs(want).max():.3g})')
    assert err < 1e-6, err


@pytest.mark.slow
def test_converted_checkpoint_folder(ref):
    folder = ref['converted']
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    assert manifest['layout'] == 'fid-inception'
    assert set(manifest['parts']) == {'inception'}
    ignored = {d['key'] for d in manifest['parts']['inception']['ignored']}
    assert {'fc.weight', 'fc.bias', 'Mixed_7c.branch_pool.bn.num_batches_tracked'} <= ignored
    assert json.load(open(os.path.join(folder, 'config.json'))) == {}
    # the three ways of loading give the same tensors
    a = flatten(load_inception_params(folder))
    b = flatten(load_inception_params(os.path.join(folder, 'inception.safetensors')))
    c = flatten(load_inception_params(ref['pth']))
    sd = torch.load(ref['pth'], weights_only=True)
    assert set(a) == set(b) == set(c) == set(flatten(abstract_params()))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(c[k]))
    np.testing.assert_array_equal(np.asarray(a['Mixed_6b/branch7x7_2/conv/kernel']),
                                  sd['Mixed_6b.branch7x7_2.conv.weight'].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(a['Mixed_7c/branch3x3dbl_3b/bn/running_var']),
                                  sd['Mixed_7c.branch3x3dbl_3b.bn.running_var'].numpy())
    np.testing.assert_array_equal(np.asarray(a['Conv2d_1a_3x3/bn/scale']),
                                  sd['Conv2d_1a_3x3.bn.weight'].numpy())


@pytest.mark.slow
def test_cli_converts_the_inception_file(ref, tmp_path):
    from vd_jax.convert.__main__ import main
    out = str(tmp_path / 'cli')
    assert main([ref['pth'], out]) == 0
    assert os.path.isfile(os.path.join(out, 'inception.safetensors'))
    assert main([ref['pth'], out]) == 2  # exists, no --overwrite


# ----------------------------------------------------------------------------------------
# The converter's table against the full key list
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def full_shapes(ref):
    """Key -> shape of the reference network's full state dict (random weights, no download):
    the key list of `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity loads that file into
    this module strictly), plus the `num_batches_tracked` counters a current PyTorch adds."""
    return {k: tuple(v.shape) for k, v in ref['model'].state_dict().items()}


def test_table_covers_full_key_list(full_shapes):
    target = flatten(abstract_params())
    for shapes in (full_shapes,  # with the counters, and as the 2019 file has it: without
                   {k: v for k, v in full_shapes.items() if not k.endswith('num_batches_tracked')}):
        layout, plans, _, record = plan_conversion(ShapeSource(shapes), {})
        assert layout.name == 'fid-inception'
        plan = plans['inception']
        assert len(plan.entries) == len(target) == 470
        ignored = {k for k, _ in plan.ignored}
        assert ignored == {k for k in shapes if k.startswith('fc.') or k.endswith('num_batches_tracked')}
        assert len(plan.entries) + len(ignored) == len(shapes)
    assert full_shapes['fc.weight'] == (1008, 2048)
    n_params = sum(int(np.prod(v.shape)) for v in target.values())
    print(f'{len(target)} tensors, {n_params / 1e6:.2f}M parameters (+ fc, ignored)')


def test_fid_inception_is_a_model_family():
    from vd_jax.models import family
    from vd_jax.models.init import abstract_params as family_abstract_params
    fam = family('fid_inception')
    assert fam.make_config({'resize_input': False}) == InceptionConfig(resize_input=False)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['resize'\]"):
        fam.make_config({'resize': True})
    model = fam.build({})
    (images,) = fam.example_inputs(model.config, batch=2)
    assert images.shape == (2, FID_INPUT_SIZE, FID_INPUT_SIZE, 3)
    params = family_abstract_params(model)
    assert len(flatten(params)) == 470
    out = jax.eval_shape(lambda p, x: model.apply({'params': p}, x), params, images)
    assert out.shape == (2, 2048)


def test_converter_is_strict(full_shapes):
    bad = dict(full_shapes)
    del bad['Mixed_6c.branch7x7dbl_3.conv.weight']                       # missing
    bad['Mixed_5b.branch5x5_2.bn.extra'] = (64,)                            # unexpected
    bad['Mixed_7b.branch3x3_2a.conv.weight'] = (384, 384, 3, 1)             # transposed kernel
    with pytest.raises(CheckpointError) as e:
        plan_conversion(ShapeSource(bad), {})
    msg = str(e.value)
    assert 'Mixed_6c/branch7x7dbl_3/conv/kernel' in msg          # named as missing
    assert 'Mixed_5b.branch5x5_2.bn.extra' in msg                 # named as unexpected
    assert 'Mixed_7b.branch3x3_2a.conv.weight: shape (384, 384, 3, 1), expected (384, 384, 1, 3)' in msg
    # torchvision's ImageNet Inception3 (aux classifier) is not the FID network
    tv = dict(full_shapes, **{'AuxLogits.fc.weight': (1000, 768)})
    with pytest.raises(CheckpointError, match='AuxLogits.fc.weight'):
        plan_conversion(ShapeSource(tv), {})


# ----------------------------------------------------------------------------------------
# Input handling: pytorch-fid's resize and scaling
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('hw', [(75, 75), (512, 384), (300, 1000), (299, 299), (1, 2), (37, 5000)])
def test_resize_matches_torch(hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    u8 = rng.integers(0, 256, (2,) + hw + (3,), dtype=np.uint8)
    # pytorch-fid: ToTensor (float32 x / 255), F.interpolate(bilinear, align_corners=False), 2x - 1
    t = torch.from_numpy(u8.transpose(0, 3, 1, 2).copy()).float().div(255)
    t = F.interpolate(t, size=(299, 299), mode='bilinear', align_corners=False)
    want = (2 * t - 1).numpy().transpose(0, 2, 3, 1)
    x = u8.astype(np.float32) / np.float32(255)
    got = jax.jit(preprocess)(x)
    err = _max(got, want)
    print(f'{hw}: max abs error {err:.3g}')
    assert got.shape == (2, 299, 299, 3)
    assert err < RESIZE_TOL, err
    if hw == (299, 299):
        np.testing.assert_array_equal(np.asarray(resize_bilinear(jnp.asarray(x))), x)


@pytest.mark.slow
def test_extractor_inputs(fx):
    """uint8 == float x / 255; a list of mixed sizes == the per-size batches; bad input."""
    u8 = _images(2, FID_INPUT_SIZE, FID_INPUT_SIZE, seed=3)
    a = fx(u8)
    np.testing.assert_array_equal(a, fx(u8.astype(np.float32) / np.float32(255)))
    small = _images(1, 75, 75, seed=4)[0]
    mixed = fx([u8[0], small, u8[1]])
    np.testing.assert_allclose(mixed[[0, 2]], a, rtol=0, atol=FEATURE_TOL)
    np.testing.assert_allclose(mixed[1], fx(small)[0], rtol=0, atol=FEATURE_TOL)
    assert _max(mixed[0], mixed[1]) > 100 * FEATURE_TOL
    with pytest.raises(InputError, match=r'must lie in \[0, 1\]'):
        fx(u8.astype(np.float32))
    with pytest.raises(InputError, match=r'expected \(B, H, W, 3\)'):
        fx(u8[..., :1])
    with pytest.raises(InputError, match='dtype int32'):
        fx(u8.astype(np.int32))
    with pytest.raises(InputError, match='no images'):
        fx([])
    with pytest.raises(ValueError, match='at least 75 x 75'):
        InceptionV3(InceptionConfig(resize_input=False)).apply({'params': fx.params},
                                                               jnp.zeros((1, 64, 64, 3)))


# ----------------------------------------------------------------------------------------
# Statistics and the distance
# ----------------------------------------------------------------------------------------

def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (d, d)) / np.sqrt(d)
    return np.abs(rng.normal(shift, 1, (n, d)) @ mix + 0.5 + shift)  # nonnegative like pool3


def test_running_statistics_match_numpy():
    f = _features(257, 48, seed=0) * 100 + 1e4  # offset: a naive E[xx^T] would lose digits
    stats = RunningStatistics(48)
    for chunk in np.array_split(f, [1, 50, 51, 200]):  # uneven batches, one of size 0... 1
        stats.update(chunk)
    assert stats.n == 257
    np.testing.assert_allclose(stats.mu, np.mean(f, axis=0), rtol=1e-13)
    cov = np.cov(f, rowvar=False)  # pytorch-fid's calculate_activation_statistics
    assert _max(stats.sigma, cov) < 1e-10 * np.abs(cov).max()
    with pytest.raises(InputError, match='at least 2 images'):
        RunningStatistics(48).update(f[:1]).sigma
    with pytest.raises(InputError, match=r'features must be \(B, 48\)'):
        stats.update(f[:, :10])


@pytest.mark.slow
@pytest.mark.parametrize('n1,n2,d', [(400, 300, 64), (40, 30, 64), (150, 200, 256)])
def test_frechet_distance_matches_pytorch_fid(pytorch_fid, n1, n2, d):
    """Regular statistics and rank-deficient ones (fewer images than dimensions). (At
    d = 2048 scipy's sqrtm takes ~40 s here, ours ~10 s; measured rel. difference 2.8e-8.)"""
    s1 = RunningStatistics(d).update(_features(n1, d, seed=1))
    s2 = RunningStatistics(d).update(_features(n2, d, seed=2, shift=0.3))
    mu1, sig1 = s1.mu_sigma()
    mu2, sig2 = s2.mu_sigma()
    t0 = time.time()
    ours = frechet_distance(mu1, sig1, mu2, sig2)
    t1 = time.time()
    want = float(pytorch_fid.calculate_frechet_distance(mu1, sig1, mu2, sig2))
    t2 = time.time()
    rel = abs(ours - want) / abs(want)
    print(f'n=({n1},{n2}) d={d}: ours {ours:.10g} ({t1 - t0:.2f}s), pytorch-fid {want:.10g} '
          f'({t2 - t1:.2f}s), rel {rel:.3g}')
    assert rel < FID_RTOL, (ours, want)
    # symmetric, and zero against itself (up to the square-root rounding)
    assert abs(frechet_distance(mu2, sig2, mu1, sig1) - ours) < FID_RTOL * ours
    assert abs(frechet_distance(mu1, sig1, mu1, sig1)) < 1e-6 * np.trace(sig1)


def test_statistics_files_interchange_with_pytorch_fid(pytorch_fid, tmp_path):
    f = _features(60, 32, seed=5)
    stats = RunningStatistics(32).update(f)
    ours = str(tmp_path / 'ours.npz')
    stats.save(ours)
    # pytorch-fid reads our file with its own loader (the model is unused for .npz paths)
    m, s = pytorch_fid.compute_statistics_of_path(ours, None, 50, 32, 'cpu')
    np.testing.assert_array_equal(m, stats.mu)
    np.testing.assert_array_equal(s, stats.sigma)
    # and we read a file in pytorch-fid's format (save_fid_stats: np.savez_compressed)
    theirs = str(tmp_path / 'theirs.npz')
    np.savez_compressed(theirs, mu=np.mean(f, 0).astype(np.float32), sigma=np.cov(f, rowvar=False))
    mu, sigma = load_statistics(theirs)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(sigma, np.cov(f, rowvar=False))
    assert abs(fid_from_statistics(ours, theirs)) < 1e-6
    assert fid_from_statistics(stats, (mu + 1, sigma)) == pytest.approx(32.0, rel=1e-7)
    # bad files and statistics
    np.savez(str(tmp_path / 'nomu.npz'), sigma=sigma)
    with pytest.raises(InputError, match=r"has no \['mu'\]"):
        load_statistics(str(tmp_path / 'nomu.npz'))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with pytest.raises(InputError, match='cannot read statistics file'):
        load_statistics(str(tmp_path / 'junk.npz'))
    with pytest.raises(InputError, match='does not exist'):
        load_statistics(str(tmp_path / 'missing.npz'))
    with pytest.raises(InputError, match='must end in .npz'):
        save_statistics(str(tmp_path / 'x.npy'), mu, sigma)
    with pytest.raises(InputError, match='different dimensions'):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(InputError, match=r'and sigma \(D, D\)'):
        frechet_distance(mu, sigma[:4], mu, sigma)
    with pytest.raises(InputError, match='not a covariance'):
        frechet_distance(mu, -sigma, mu, sigma)


def test_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match='do not exist'):
        load_inception_params(str(tmp_path / 'nothing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointError, match='has no inception.safetensors'):
        load_inception_params(str(tmp_path / 'empty'))
