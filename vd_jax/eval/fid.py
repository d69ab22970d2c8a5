"""Fréchet Inception Distance: the standard FID InceptionV3 in JAX, statistics, the distance.

    from vd_jax.eval.fid import (InceptionFeatureExtractor, RunningStatistics, convert_inception,
                                 frechet_distance, load_statistics)
    convert_inception('pt_inception-2015-12-05-6726825d.pth', 'converted/fid-inception')
    fx = InceptionFeatureExtractor.from_pretrained('converted/fid-inception', batch_size=50)
    stats = RunningStatistics()
    for batch in batches:                 # (B, H, W, 3) uint8, or float in [0, 1]; any size
        stats.update(fx(batch))           # (B, 2048) float32 pool3 features
    stats.save('samples.npz')             # `mu`, `sigma`: pytorch-fid's .npz keys
    fid = frechet_distance(*stats.mu_sigma(), *load_statistics('reference.npz'))

The network and its input handling are pytorch-fid's (`vd_jax.models.inception`): bilinear
resize to 299 x 299 (align_corners=False), [0, 1] -> [-1, 1], pool3. uint8 images are divided
by 255 in float32 first, on the host (torchvision's `ToTensor`, as pytorch-fid reads image
files).
Statistics are accumulated in float64 (mean and covariance with ddof=1, as `np.cov`), so
statistics files are interchangeable with pytorch-fid's (`--save-stats`) both ways.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.checkpoint import load_params
from vd_jax.errors import CheckpointError, InputError
from vd_jax.eval.reference import iter_images
from vd_jax.image_io import load_image
from vd_jax.models.inception import FEATURE_DIM, InceptionConfig, InceptionV3, abstract_params

PART = 'inception'
PARAMS_FILE = f'{PART}.safetensors'

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------

def convert_inception(src: PathLike, out: PathLike, *, overwrite: bool = False,
                      dtype: str = 'float32') -> str:
    """Convert the FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) strictly.

    Same engine and rules as `python -m vd_jax.convert SRC OUT` (part 'inception'): every
    key mapped or ignored by name (`fc.*`, `*.num_batches_tracked`), every parameter filled
    once with its shape checked. Writes a checkpoint folder with `inception.safetensors`,
    `manifest.json` and an empty `config.json` (the architecture is fixed). Returns `out`.
    """
    # lazy: vd_jax.convert pulls in 10 modules (+85 ms)
    from vd_jax.convert import convert_checkpoint  # noqa: PLC0415
    return convert_checkpoint(os.fspath(src), {}, os.fspath(out), parts=[PART],
                              overwrite=overwrite, dtype=dtype)


def load_inception_params(path: PathLike, dtype=None):
    """FID Inception params from a converted folder, its `inception.safetensors`, or straight
    from the PyTorch `.pth` (converted in memory; needs torch). Shapes are checked."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"Inception weights '{path}' do not exist")
    if os.path.isdir(path):
        file = os.path.join(path, PARAMS_FILE)
        if not os.path.isfile(file):
            raise CheckpointError(f"'{path}' has no {PARAMS_FILE}; convert the FID weights first: "
                                  f'python -m vd_jax.convert pt_inception-2015-12-05-6726825d.pth {path}')
        return load_params(file, dtype=dtype, expected=abstract_params())
    if path.endswith('.safetensors'):
        return load_params(path, dtype=dtype, expected=abstract_params())
    from vd_jax.convert import convert_checkpoint  # noqa: PLC0415
    params = convert_checkpoint(path, {}, None, parts=[PART])[PART]
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype or a.dtype), params)


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------

def _load_item(item, index: int) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    a = np.asarray(item)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f'image {index}: expected (H, W, 3) channels-last, got shape {a.shape}')
    return a


def _check_images(x: np.ndarray, what: str) -> np.ndarray:
    """Validate one (N, H, W, 3) stack: uint8, or float in [0, 1]."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f'{what}: expected (B, H, W, 3) channels-last RGB, got shape {x.shape}')
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise InputError(f'{what}: empty images of shape {x.shape}')
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f'{what}: dtype {x.dtype} is not supported (uint8, or float in [0, 1])')
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise InputError(f'{what}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]')
    return x.astype(np.float32, copy=False)


class InceptionFeatureExtractor:
    """Batched, jitted pool3 features of the FID InceptionV3.

    Args:
      params: the converted Inception params (`load_inception_params`).
      batch_size: images per device call; the last batch is padded, so one compile serves
        every call with the same image size and dtype.
      dtype: compute dtype (float32 for reference FIDs; bfloat16 moves FID values).
      config: input handling (`InceptionConfig`; default pytorch-fid's resize + normalise).
    Calling it on images (B, H, W, 3) uint8 or float in [0, 1] (an array, or a list of
    (H, W, 3) arrays / image files; mixed sizes are run size by size) returns (B, 2048)
    float32 features in input order.
    """

    def __init__(self, params, *, batch_size: int = 50, dtype=jnp.float32,
                 config: InceptionConfig = InceptionConfig()):
        if batch_size < 1:
            raise InputError(f'batch_size must be >= 1, got {batch_size}')
        self.params = params
        self.batch_size = int(batch_size)
        self.model = InceptionV3(config, dtype=dtype)
        self._features = jax.jit(lambda p, x: self.model.apply({'params': p}, x))

    @classmethod
    def from_pretrained(cls, path: PathLike, **kwargs) -> 'InceptionFeatureExtractor':
        """From a converted folder, an `inception.safetensors`, or the `.pth` itself."""
        return cls(load_inception_params(path), **kwargs)

    def _run(self, x: np.ndarray) -> np.ndarray:
        n, bs = x.shape[0], self.batch_size
        out = np.empty((n, FEATURE_DIM), np.float32)
        for start in range(0, n, bs):
            chunk = x[start:start + bs]
            k = chunk.shape[0]
            if chunk.dtype == np.uint8:
                # torchvision's ToTensor (pytorch-fid's loader): float32 x / 255, on the host so
                # the bits are IEEE division's whatever XLA would fuse (the deep network
                # amplifies one-ulp input differences to ~1e-5)
                chunk = chunk.astype(np.float32) / np.float32(255)
            if k < bs:  # pad the last batch: the compiled shape stays (batch_size, H, W, 3)
                chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], chunk.dtype)])
            out[start:start + k] = np.asarray(self._features(self.params, chunk))[:k]
        return out

    def __call__(self, images) -> np.ndarray:
        if isinstance(images, (list, tuple)):
            if not images:
                raise InputError('no images given')
            items = [_load_item(im, i) for i, im in enumerate(images)]
            groups = {}
            for i, a in enumerate(items):
                groups.setdefault((a.shape, a.dtype.kind == 'u'), []).append(i)
            out = np.empty((len(items), FEATURE_DIM), np.float32)
            for (shape, _), idx in groups.items():
                stack = _check_images(np.stack([items[i] for i in idx]),
                                      f'images of size {shape[0]}x{shape[1]}')
                out[idx] = self._run(stack)
            return out
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        x = _check_images(x, 'images')
        if x.shape[0] == 0:
            raise InputError('no images given (batch of size 0)')
        return self._run(x)


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------

class RunningStatistics:
    """Mean and covariance of features over many batches, in float64.

    Batches are merged with Chan et al.'s pairwise update (count, mean, sum of squared
    deviations), so there is no E[xx^T] - mu mu^T cancellation however many images go in.
    `sigma` is the unbiased covariance (ddof=1), as pytorch-fid's `np.cov(act, rowvar=False)`.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = int(dim)
        self.n = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> 'RunningStatistics':
        """Add features (B, dim)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise InputError(f'features must be (B, {self.dim}), got shape {f.shape}')
        if not np.all(np.isfinite(f)):
            raise InputError('features contain NaN or inf (bad images or weights?)')
        k = f.shape[0]
        if k == 0:
            return self
        mean_b = f.mean(axis=0)
        d = f - mean_b
        m2_b = d.T @ d
        n = self.n + k
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (k / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * k / n)
        self.n = n
        return self

    @property
    def mu(self) -> np.ndarray:
        if self.n < 1:
            raise InputError('no features added yet')
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise InputError(f'a covariance needs at least 2 images, have {self.n}')
        s = self._m2 / (self.n - 1)
        return (s + s.T) / 2  # exactly symmetric

    def mu_sigma(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma

    def save(self, path: PathLike) -> None:
        """Write `mu`, `sigma` (and `num_images`) to a pytorch-fid compatible `.npz`."""
        save_statistics(path, self.mu, self.sigma, num_images=self.n)


def save_statistics(path: PathLike, mu, sigma, num_images: Optional[int] = None) -> None:
    """Write FID statistics to `.npz` with pytorch-fid's keys `mu` (D,) and `sigma` (D, D),
    float64, atomically (a temporary file renamed at the end)."""
    path = os.fspath(path)
    if not path.endswith('.npz'):
        raise InputError(f"statistics file '{path}' must end in .npz (pytorch-fid's format)")
    mu, sigma = _check_stats(mu, sigma, path)
    extra = {} if num_images is None else {'num_images': np.int64(num_images)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.npz', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, mu=mu, sigma=sigma, **extra)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_statistics(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from a `.npz` with keys `mu` and `sigma` (ours or pytorch-fid's)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"statistics file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ('mu', 'sigma') if k not in f.files]
            if missing:
                raise InputError(f"'{path}' has no {missing} (keys: {f.files}); FID statistics "
                                 "files hold 'mu' and 'sigma'")
            mu, sigma = f['mu'], f['sigma']
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (not a zip / truncated / pickled objects)
        raise InputError(f"cannot read statistics file '{path}': {type(e).__name__}: {e}") from None
    return _check_stats(mu, sigma, path)


def _check_stats(mu, sigma, what: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f'{what}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise InputError(f'{what}: mu or sigma contains NaN or inf')
    return mu, sigma


def _sqrt_psd(s: np.ndarray, what: str) -> np.ndarray:
    """Symmetric square root of a covariance; rounding-level negative eigenvalues -> 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    # float32-computed covariances carry ~1e-7 relative noise; anything beyond is not one
    tol = 1e-5 * max(float(np.max(np.abs(w))), 1e-300)
    if w[0] < -tol:
        raise InputError(f'{what} is not a covariance matrix (eigenvalue {w[0]:.3g} < 0)')
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed without a general matrix square root: with A = S1^(1/2)
    (symmetric), S1 S2 = A (A S2 A) A^-1 is similar to the symmetric PSD matrix A S2 A, so
    the trace is the sum of the square roots of its eigenvalues (`eigvalsh`). This needs no
    eps offset for singular covariances (fewer images than dimensions) and has no imaginary
    parts to discard, unlike `scipy.linalg.sqrtm(S1 @ S2)` in pytorch-fid; on regular
    statistics both agree to ~1e-10 relative.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, 'first statistics')
    mu2, sigma2 = _check_stats(mu2, sigma2, 'second statistics')
    if mu1.shape != mu2.shape:
        raise InputError(f'statistics of different dimensions: {mu1.shape[0]} and {mu2.shape[0]}')
    a = _sqrt_psd(sigma1, 'sigma1')
    m = a @ ((sigma2 + sigma2.T) / 2) @ a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(ev, 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_statistics(a, b) -> float:
    """FID between two statistics, each a `.npz` path, a `RunningStatistics` or (mu, sigma)."""
    def get(s):
        if isinstance(s, RunningStatistics):
            return s.mu_sigma()
        if isinstance(s, (str, os.PathLike)):
            return load_statistics(s)
        mu, sigma = s
        return mu, sigma
    return frechet_distance(*get(a), *get(b))


def folder_statistics(paths: Sequence[str], extractor, hw: Optional[Tuple[int, int]],
                      progress: Optional[Callable[[int], None]] = None) -> RunningStatistics:
    """Inception statistics of image files (`fit` to hw unless None), streamed."""
    stats = RunningStatistics()
    chunk = max(1, extractor.batch_size) * 4
    for images in iter_images(list(paths), hw, chunk):
        same = len({im.shape for im in images}) == 1
        stats.update(extractor(np.stack(images) if same else images))
        if progress:
            progress(len(images))
    return stats



def check_statistics(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics `.npz`, which must be Inception pool3 statistics:
    mu (2048,) and sigma (2048, 2048)."""
    mu, sigma = load_statistics(path)
    if mu.shape != (FEATURE_DIM,):
        raise InputError(f"statistics file '{path}': mu has shape {mu.shape}, sigma "
                         f'{sigma.shape}; FID Inception statistics are ({FEATURE_DIM},) and '
                         f'({FEATURE_DIM}, {FEATURE_DIM})')
    return mu, sigma


# ----------------------------------------------------------------------------------------
# The metric of `python -m vd_jax.eval fid`
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class FIDMetric:
    """FID of generated samples against a reference: a statistics file or an image folder.

    inception: the weights (`InceptionFeatureExtractor.from_pretrained`); batch_size: images
    per Inception call; ref_stats: (mu, sigma) of a checked statistics file and its path, or
    ref_paths: the reference images (from ref_images, a folder) brought to ref_size x
    ref_size (None: the samples' size; 0: as they are); stats_out: also save the reference
    folder's statistics there. bar(total, desc): a progress bar (a context with update(k)).
    The metric protocol (as `vd_jax.eval.clip_score.CLIPMetric`): load() before the model,
    prepare(hw, folder) before sampling, score(vd, paths, inputs, folder) after.
    """
    inception: str
    batch_size: int
    bar: Callable
    ref_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None
    ref_stats_path: Optional[str] = None
    ref_paths: Optional[List[str]] = None
    ref_images: Optional[str] = None
    ref_size: Optional[int] = None
    stats_out: Optional[str] = None
    log: Callable[[str], None] = print
    extractor: Optional[InceptionFeatureExtractor] = None
    reference_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def load(self) -> None:
        """Load the Inception network (before the diffusion model: a bad file fails fast)."""
        self.extractor = InceptionFeatureExtractor.from_pretrained(self.inception,
                                                                   batch_size=self.batch_size)

    def reference(self, hw: Tuple[int, int], folder: str) -> Tuple[np.ndarray, np.ndarray, dict]:
        """(mu, sigma, record) of the reference: the statistics file, or the image folder
        (cached in the run folder as reference_stats.npz, so a resumed run does not
        recompute)."""
        if self.ref_stats is not None:
            mu, sigma = self.ref_stats
            return mu, sigma, {'kind': 'statistics', 'path': os.path.abspath(self.ref_stats_path)}
        size = None if self.ref_size == 0 else ((self.ref_size, self.ref_size) if self.ref_size
                                                else tuple(hw))
        rec = {'kind': 'images', 'path': os.path.abspath(self.ref_images),
               'num_images': len(self.ref_paths),
               'preprocess': (f'centre crop + bicubic resize to {size[0]}x{size[1]}' if size
                              else 'none (original sizes)'),
               'inception': os.path.abspath(self.inception)}
        cache, cache_rec = (os.path.join(folder, 'reference_stats.npz'),
                            os.path.join(folder, 'reference.json'))
        if os.path.isfile(cache) and os.path.isfile(cache_rec):
            with open(cache_rec) as f:
                if json.load(f) == rec:
                    self.log(f'reference statistics: reusing {cache}')
                    mu, sigma = load_statistics(cache)
                    return mu, sigma, dict(rec, cached=cache)
        t0 = time.time()
        with self.bar(len(self.ref_paths), 'reference features') as bar:
            stats = folder_statistics(self.ref_paths, self.extractor, size, bar.update)
        stats.save(cache)
        with open(cache_rec, 'w') as f:
            json.dump(rec, f, indent=1)
        if self.stats_out:
            save_statistics(self.stats_out, *stats.mu_sigma(), num_images=stats.n)
            self.log(f'wrote the reference statistics to {self.stats_out}')
            rec['saved_to'] = os.path.abspath(self.stats_out)
        rec['seconds'] = round(time.time() - t0, 1)
        return stats.mu, stats.sigma, rec

    def prepare(self, hw: Tuple[int, int], folder: str) -> dict:
        """Before sampling: the reference statistics; returns the record's entries."""
        mu, sigma, rec = self.reference(hw, folder)
        self.reference_stats = (mu, sigma)
        return {'reference': rec}

    def score(self, vd, paths: Sequence[str], inputs: Sequence[str], folder: str
              ) -> Tuple[dict, str]:
        """FID of the sample files against the reference (`prepare`); their statistics are
        saved as samples_stats.npz. Returns (the record's entries, a one-line summary)."""
        with self.bar(len(paths), 'sample features') as bar:
            stats = folder_statistics(paths, self.extractor, None, bar.update)
        stats.save(os.path.join(folder, 'samples_stats.npz'))
        fid = frechet_distance(stats.mu, stats.sigma, *self.reference_stats)
        return {'fid': fid, 'inception': os.path.abspath(self.inception)}, f'fid = {fid:.4f}'
