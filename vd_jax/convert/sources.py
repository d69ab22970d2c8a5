"""Lazy readers of PyTorch state dicts: names and shapes first, one tensor's data at a time.

`.pth`/`.bin`/`.ckpt` go through `torch.load(mmap=True, weights_only=True)` (the optional
`convert` extra); `.safetensors` is memory-mapped without torch; a diffusers pipeline or
model folder becomes one source whose keys carry the sub-folder as prefix
(`image_unet.`, `text_unet.`, `vae.`, `text_encoder.`, `image_encoder.`).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from vd_jax.checkpoint import CheckpointError, load_safetensors


class SourceError(ValueError):
    """A source checkpoint cannot be read (missing, truncated, not a state dict...)."""


class TensorSource:
    """A state dict read lazily: `keys()`, `shape(k)`, `dtype(k)` without data; `get(k)`."""
    path = '<memory>'

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


class DictSource(TensorSource):
    """An in-memory mapping name -> numpy array or torch tensor."""

    def __init__(self, tensors: Mapping, path: str = '<memory>'):
        self._t = dict(tensors)
        self.path = path

    def keys(self):
        return list(self._t)

    def shape(self, key):
        return tuple(self._t[key].shape)

    def dtype(self, key):
        return str(self._t[key].dtype).replace('torch.', '')

    def get(self, key):
        v = self._t[key]
        return v if isinstance(v, np.ndarray) else _torch_to_numpy(v)


_WRAPPER_KEYS = ('state_dict', 'model', 'module')


class TorchFileSource(DictSource):
    """A `torch.save`d state dict, memory-mapped when the file is in zip format."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise SourceError(f"reading '{path}' needs PyTorch: pip install -e '.[convert]' "
                              "(torch==2.13.0)") from None
        try:
            obj = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
        except RuntimeError as e:
            if 'mmap' in str(e) and 'zip' in str(e):  # pre-1.6 pickle format: no mmap
                warnings.warn(f"'{path}' is in the legacy torch format; loading it whole")
                try:
                    obj = torch.load(path, map_location='cpu', weights_only=True)
                except Exception as e2:  # noqa: BLE001
                    raise SourceError(f"cannot read '{path}': {e2}") from None
            else:
                raise SourceError(f"cannot read '{path}' (truncated or not a torch checkpoint?): "
                                  f"{str(e).splitlines()[0]}") from None
        except Exception as e:  # noqa: BLE001  (pickle errors, EOFError, ...)
            raise SourceError(f"cannot read '{path}' (truncated or not a torch checkpoint?): "
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
        obj = _unwrap_state_dict(obj, path)
        super().__init__(obj, path)


def _unwrap_state_dict(obj, path):
    import torch
    if not isinstance(obj, Mapping):
        raise SourceError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    for k in _WRAPPER_KEYS:
        if k in obj and isinstance(obj[k], Mapping) and not isinstance(obj[k], torch.Tensor):
            inner = obj[k]
            if all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SourceError(f"'{path}' is not a flat state dict: entries {bad[:5]} are not tensors")
    return obj


class SafetensorsSource(TensorSource):

    def __init__(self, path: str):
        try:
            self._t = load_safetensors(path)
        except CheckpointError as e:
            raise SourceError(str(e)) from None
        self.path = path

    def keys(self):
        return list(self._t)

    def shape(self, key):
        return tuple(self._t[key].shape)

    def dtype(self, key):
        return str(self._t[key].dtype)

    def get(self, key):
        return np.asarray(self._t[key])


class MergedSource(TensorSource):
    """Several sources under key prefixes (a diffusers pipeline folder)."""

    def __init__(self, parts: Mapping[str, TensorSource], path: str):
        self._parts = dict(parts)
        self._index: Dict[str, Tuple[TensorSource, str]] = {}
        for prefix, src in self._parts.items():
            for k in src.keys():
                self._index[prefix + k] = (src, k)
        self.path = path

    def keys(self):
        return list(self._index)

    def shape(self, key):
        s, k = self._index[key]
        return s.shape(k)

    def dtype(self, key):
        s, k = self._index[key]
        return s.dtype(k)

    def get(self, key):
        s, k = self._index[key]
        return s.get(k)


# diffusers class name -> the sub-folder name a VD pipeline gives it
DIFFUSERS_CLASSES = {
    'UNet2DConditionModel': 'image_unet', 'UNetFlatConditionModel': 'text_unet',
    'AutoencoderKL': 'vae', 'CLIPTextModelWithProjection': 'text_encoder',
    'CLIPTextModel': 'text_encoder', 'CLIPVisionModelWithProjection': 'image_encoder',
    'CLIPVisionModel': 'image_encoder'}
DIFFUSERS_FOLDERS = ('image_unet', 'text_unet', 'vae', 'text_encoder', 'image_encoder')
_WEIGHT_NAMES = ('diffusion_pytorch_model.safetensors', 'model.safetensors',
                 'diffusion_pytorch_model.bin', 'pytorch_model.bin')


def _model_folder_source(folder: str) -> TensorSource:
    for name in _WEIGHT_NAMES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return open_file(p)
    index = sorted(glob.glob(os.path.join(folder, '*.index.json')))
    if index:
        with open(index[0]) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
        return MergedSource({'': _ConcatSource([open_file(os.path.join(folder, n)) for n in files],
                                               folder)}, folder)
    raise SourceError(f"diffusers folder '{folder}' has no weights file (looked for "
                      f"{', '.join(_WEIGHT_NAMES)} or a sharded *.index.json)")


class _ConcatSource(MergedSource):
    def __init__(self, sources, path):
        super().__init__({}, path)
        for s in sources:
            for k in s.keys():
                if k in self._index:
                    raise SourceError(f"key '{k}' appears in two shards of '{path}'")
                self._index[k] = (s, k)


def open_file(path: str) -> TensorSource:
    if not os.path.exists(path):
        raise SourceError(f"source '{path}' does not exist")
    if path.endswith('.safetensors'):
        return SafetensorsSource(path)
    return TorchFileSource(path)


def open_source(path: str) -> TensorSource:
    """Open a checkpoint file, a diffusers model folder or a diffusers pipeline folder."""
    if not os.path.exists(path):
        raise SourceError(f"source '{path}' does not exist")
    if not os.path.isdir(path):
        return open_file(path)
    subs = [d for d in DIFFUSERS_FOLDERS if os.path.isdir(os.path.join(path, d))]
    if subs:
        parts = {}
        for d in subs:
            folder = os.path.join(path, d)
            if any(os.path.isfile(os.path.join(folder, n)) for n in _WEIGHT_NAMES) or \
                    glob.glob(os.path.join(folder, '*.index.json')):
                parts[d + '.'] = _model_folder_source(folder)
        if not parts:
            raise SourceError(f"diffusers folder '{path}' has sub-folders {subs} but no weights")
        return MergedSource(parts, path)
    cfg = os.path.join(path, 'config.json')
    if os.path.isfile(cfg):
        with open(cfg) as f:
            cls = json.load(f).get('_class_name') or (json.load(open(cfg)).get('architectures')
                                                      or [None])[0]
        if cls not in DIFFUSERS_CLASSES:
            raise SourceError(f"'{path}': model class {cls!r} is not one vd_jax converts "
                              f"(known: {sorted(DIFFUSERS_CLASSES)})")
        return MergedSource({DIFFUSERS_CLASSES[cls] + '.': _model_folder_source(path)}, path)
    raise SourceError(f"folder '{path}' is neither a diffusers pipeline (sub-folders "
                      f"{DIFFUSERS_FOLDERS}) nor a diffusers/transformers model folder (config.json)")


class ShapeSource(TensorSource):
    """Key -> shape only (no data): for checking a mapping, e.g. against a key listing."""

    def __init__(self, shapes: Mapping[str, Tuple[int, ...]], path: str = '<shapes>'):
        self._s = {k: tuple(v) for k, v in shapes.items()}
        self.path = path

    def keys(self):
        return list(self._s)

    def shape(self, key):
        return self._s[key]

    def dtype(self, key):
        return 'unknown'

    def get(self, key):
        raise SourceError(f"'{self.path}' has shapes only; no data for '{key}'")
