"""Lazy readers of PyTorch state dicts: names and shapes first, one tensor's data at a time.

`.pth`/`.bin`/`.ckpt` go through `torch.load(mmap=True, weights_only=True)` (the optional
`convert` extra); `.safetensors` is memory-mapped without torch; a diffusers pipeline or
model folder becomes one source whose keys carry the sub-folder as prefix
(`image_unet.`, `text_unet.`, `vae.`, `text_encoder.`, `image_encoder.`), plus `vae_text.`
for the text VAE `vd_jax.export` writes beside them (`vae_text.safetensors`).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
import zipfile
from typing import Dict, List, Mapping, Tuple

import numpy as np

from vd_jax.checkpoint import load_safetensors
from vd_jax.errors import CheckpointError


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
    # lazy: torch, tqdm (+1.8 s)
    import torch  # noqa: PLC0415
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


# What `torch.save` files start with: a zip archive (torch >= 1.6), or a pickle (PROTO opcode
# 0x80) whose first object is the legacy format's magic number 0x1950a86a20f9469cfc6c
# (little-endian bytes below; right after the PROTO 2 / LONG1 opcodes with the default protocol).
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'l\xfc\x9cF\xf9 j\xa8P\x19'
_HEAD = 512


def _sniff(path: str) -> Tuple[str, bytes]:
    """What a file looks like from its first bytes: 'empty' | 'zip' | 'legacy' | 'tar' |
    'safetensors' | 'text' | 'unknown', and those bytes. Raises CheckpointError if unreadable."""
    try:
        with open(path, 'rb') as f:
            head = f.read(_HEAD)
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
    if not head:
        return 'empty', head
    if head.startswith(_ZIP_MAGIC):
        return 'zip', head
    if head[:1] == b'\x80' and _LEGACY_MAGIC in head[:32]:
        return 'legacy', head
    if head[257:262] == b'ustar':  # the pre-1.0 torch.save tar format
        return 'tar', head
    if len(head) > 8 and head[8:9] == b'{' and 2 <= int.from_bytes(head[:8], 'little') < 10**9:
        return 'safetensors', head
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode('utf-8')
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in '\n\r\t' for c in text[:200]):
            return 'text', head
        break
    return 'unknown', head


def _not_a_checkpoint(path: str, kind: str, head: bytes) -> CheckpointError:
    if kind == 'empty':
        return CheckpointError(f"'{path}' is empty (0 bytes), not a PyTorch checkpoint")
    if kind == 'text':
        first = head.decode('utf-8', 'replace').strip().splitlines()[0][:60] if head.strip() else ''
        if first.startswith('version https://git-lfs'):
            return CheckpointError(f"'{path}' is a Git LFS pointer (a small text file), not the "
                                   'checkpoint itself: download the real file (git lfs pull)')
        return CheckpointError(f"'{path}' is a text file ({first!r}...), not a PyTorch checkpoint")
    return CheckpointError(f"'{path}' is not a PyTorch checkpoint (a torch.save file starts with a "
                           f'zip or pickle header; this one starts with {head[:8]!r})')


def _torch_error(path: str, e: BaseException) -> CheckpointError:
    """One line for a torch.load failure. Never passes on torch's advice to load with
    weights_only=False: that would run arbitrary code from the file."""
    msg = str(e)
    if 'Weights only load failed' in msg or 'WeightsUnpickler' in msg:
        after = msg.split('WeightsUnpickler error:', 1)[1] if 'WeightsUnpickler error:' in msg else ''
        detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), '')
        detail = detail.split(' was not an allowed global')[0].split('. ')[0]
        what = ('holds Python objects besides tensors' if detail.startswith('Unsupported global')
                else "cannot be read by torch's safe (weights-only) loader")
        return CheckpointError(f"'{path}' {what} ({detail or 'refused'}); vd_jax reads only plain "
                               'tensors: re-save just the state dict (torch.save(model.state_dict(), '
                               'path)) or convert it to .safetensors')
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return CheckpointError(f"'{path}' is a damaged or truncated PyTorch checkpoint, or not one "
                           f'({type(e).__name__}: {first[:200]})')


def _check_torch_zip(path: str) -> None:
    """A zip-format torch.save file has its central directory (at the end: a cut-short copy has
    none) and a `<archive>/data.pkl` entry; reads only the directory, not the tensors."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        raise CheckpointError(f"'{path}' is a truncated or damaged PyTorch checkpoint: its zip "
                              f'directory is missing ({size:,} bytes; was the download or copy cut '
                              'short?)') from None
    if not any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
        raise CheckpointError(f"'{path}' is a zip archive but not a PyTorch checkpoint (no data.pkl "
                              f'among its {len(names)} entries, e.g. {names[:3]})')


class TorchFileSource(DictSource):
    """A `torch.save`d state dict, memory-mapped when the file is in zip format.

    The file's first bytes are checked before torch is imported, so an empty, text or other
    non-checkpoint file is reported as such (one line naming the file)."""

    def __init__(self, path: str):
        kind, head = _sniff(path)
        if kind not in ('zip', 'legacy', 'tar'):
            raise _not_a_checkpoint(path, kind, head)
        if kind == 'zip':
            _check_torch_zip(path)
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            raise CheckpointError(f"reading '{path}' needs PyTorch: pip install -e '.[convert]' "
                                  "(torch==2.13.0)") from None
        if kind != 'zip':  # the pre-1.6 formats cannot be memory-mapped
            warnings.warn(f"'{path}' is in the legacy torch format; loading it whole")
        try:
            obj = torch.load(path, map_location='cpu', mmap=kind == 'zip', weights_only=True)
        except Exception as e:  # noqa: BLE001  (RuntimeError, UnpicklingError, OSError, EOFError...)
            raise _torch_error(path, e) from None
        obj = _unwrap_state_dict(obj, path)
        super().__init__(obj, path)


def _unwrap_state_dict(obj, path):
    import torch  # noqa: PLC0415
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    for k in _WRAPPER_KEYS:
        if k in obj and isinstance(obj[k], Mapping) and not isinstance(obj[k], torch.Tensor):
            inner = obj[k]
            if all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'{path}' is not a flat state dict: entries {bad[:5]} are not tensors")
    return obj


class SafetensorsSource(TensorSource):

    def __init__(self, path: str):
        self._t = load_safetensors(path)
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


# diffusers has no Optimus class: `vd_jax.export` writes the text VAE beside the sub-folders,
# in the v1.0 names (`vae.text.*`). A pipeline folder gives its keys as `vae_text.*` (the
# `diffusers` prefix of part vae_text in `vd_jax.convert.optimus_rules`).
DIFFUSERS_TEXT_VAE = ('vae_text.safetensors', 'vae.text.')


class _StrippedSource(MergedSource):
    """`source` with `prefix` taken off every key (each key must have it)."""

    def __init__(self, source: TensorSource, prefix: str):
        super().__init__({}, source.path)
        for k in source.keys():
            if not k.startswith(prefix):
                raise CheckpointError(f"'{source.path}': key '{k}' does not start with '{prefix}' "
                                      '(the text VAE of a diffusers folder keeps the v1.0 names)')
            self._index[k[len(prefix):]] = (source, k)


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
    raise CheckpointError(f"diffusers folder '{folder}' has no weights file (looked for "
                          f"{', '.join(_WEIGHT_NAMES)} or a sharded *.index.json)")


class _ConcatSource(MergedSource):
    def __init__(self, sources, path):
        super().__init__({}, path)
        for s in sources:
            for k in s.keys():
                if k in self._index:
                    raise CheckpointError(f"key '{k}' appears in two shards of '{path}'")
                self._index[k] = (s, k)


def open_file(path: str) -> TensorSource:
    """A `.safetensors` file (by name or content) or a torch.save file."""
    if not os.path.exists(path):
        raise CheckpointError(f"source '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes), not a checkpoint")
    if path.endswith('.safetensors') or _sniff(path)[0] == 'safetensors':
        return SafetensorsSource(path)
    return TorchFileSource(path)


def read_json_object(path: str, kind: str = 'model config') -> dict:
    """A JSON file holding one object (a config); CheckpointError naming the file otherwise."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read '{path}' as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{path}' is not a {kind} (a JSON object)")
    return cfg


def _listing(folder: str, n: int = 6) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return 'it is empty'
    shown = [x + ('/' if os.path.isdir(os.path.join(folder, x)) else '') for x in names[:n]]
    return 'it has ' + ', '.join(shown) + (f' and {len(names) - n} more' if len(names) > n else '')


def open_source(path: str) -> TensorSource:
    """Open a checkpoint file, a diffusers model folder or a diffusers pipeline folder."""
    if not os.path.exists(path):
        raise CheckpointError(f"source '{path}' does not exist")
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
        name, prefix = DIFFUSERS_TEXT_VAE
        if os.path.isfile(os.path.join(path, name)):
            parts['vae_text.'] = _StrippedSource(open_file(os.path.join(path, name)), prefix)
        if not parts:
            raise CheckpointError(f"diffusers folder '{path}' has sub-folders {subs} but no weights")
        return MergedSource(parts, path)
    cfg = os.path.join(path, 'config.json')
    if os.path.isfile(cfg):
        cfg_dict = read_json_object(cfg)
        cls = cfg_dict.get('_class_name') or (cfg_dict.get('architectures') or [None])[0]
        if cls not in DIFFUSERS_CLASSES:
            raise CheckpointError(f"'{path}': model class {cls!r} is not one vd_jax converts "
                                  f"(known: {sorted(DIFFUSERS_CLASSES)})")
        return MergedSource({DIFFUSERS_CLASSES[cls] + '.': _model_folder_source(path)}, path)
    raise CheckpointError(f"folder '{path}' is not a checkpoint vd_jax knows ({_listing(path)}): "
                          f"expected a diffusers pipeline (sub-folders {', '.join(DIFFUSERS_FOLDERS)}) "
                          'or a diffusers/transformers model folder (config.json)')


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
        raise CheckpointError(f"'{self.path}' has shapes only; no data for '{key}'")
