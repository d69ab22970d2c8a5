"""vd_jax checkpoint folders: converted (inference) weights, one safetensors file per part.

A folder holds
  config.json             the model config section it was made for (ConfigDict as JSON)
  manifest.json           parts, parameter counts, where the weights came from, what was ignored
  <part>.safetensors      flat '/'-joined Flax paths -> tensors, e.g. `image/data_blocks_3/op/kernel`

Why safetensors: it can be written one tensor at a time (the header only needs shapes),
so converting the 10 GB diffuser never holds more than one tensor beside the source; it
is read by memory-mapping, so loading is lazy and each host of a pod can read only the
slices its devices own (`load_params(..., shardings=...)`); and it is a plain, pickle-free
format that PyTorch users can open too. Training state (optimizer, EMA, data iterator)
uses Orbax instead (`vd_jax.train`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from vd_jax.errors import CheckpointError

try:  # bfloat16 for numpy (a jax dependency)
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None


_ST_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
              np.dtype(np.float64): 'F64', np.dtype(np.int64): 'I64',
              np.dtype(np.int32): 'I32', np.dtype(np.uint8): 'U8', np.dtype(np.bool_): 'BOOL'}
if _BF16 is not None:
    _ST_DTYPES[_BF16] = 'BF16'
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------------------
# safetensors, written and read tensor by tensor
# ----------------------------------------------------------------------------------------

class SafetensorsWriter:
    """Write a .safetensors file whose tensors arrive one at a time, in the declared order.

    Args:
      path: file to create.
      entries: (name, shape, dtype) for every tensor, in writing order.
      metadata: str -> str, stored in the header.
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, Sequence[int], Any]],
                 metadata: Optional[Mapping[str, str]] = None):
        header, offset = {}, 0
        self._order = []
        for name, shape, dtype in entries:
            dtype = np.dtype(dtype)
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"tensor '{name}': dtype {dtype} cannot be stored")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {'dtype': _ST_DTYPES[dtype], 'shape': [int(s) for s in shape],
                            'data_offsets': [offset, offset + nbytes]}
            self._order.append((name, tuple(int(s) for s in shape), dtype))
            offset += nbytes
        if metadata:
            header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(',', ':')).encode()
        raw += b' ' * (-len(raw) % 8)  # align the data section to 8 bytes
        self._f = open(path, 'wb')
        self._f.write(struct.pack('<Q', len(raw)))
        self._f.write(raw)
        self._next = 0
        self.path = path

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise CheckpointError(f"tensor '{name}' was not declared for {self.path}")
        want, shape, dtype = self._order[self._next]
        if name != want:
            raise CheckpointError(f"tensor '{name}' written out of order (expected '{want}')")
        # np.require, not np.ascontiguousarray: the latter turns a 0-d tensor (CLIP's
        # logit_scale) into shape (1,)
        a = np.require(np.asarray(array).astype(dtype, copy=False), requirements='C')
        if a.shape != shape:
            raise CheckpointError(f"tensor '{name}': shape {a.shape}, declared {shape}")
        self._f.write(a.reshape(-1).view(np.uint8))  # bytes without a copy; any dtype, 0-d, empty
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [n for n, _, _ in self._order[self._next:]]
            self._f.close()
            raise CheckpointError(f'{self.path}: {len(missing)} declared tensors never written, '
                                  f'first {missing[:3]}')
        self._f.close()


def read_safetensors_header(path: str) -> Tuple[dict, int]:
    """(header dict, byte offset of the data section)."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
            n = struct.unpack('<Q', raw)[0]
            if n > size - 8:
                raise CheckpointError(f"'{path}' is truncated or not a safetensors file "
                                      f"(header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path}' has a corrupt safetensors header: {e}") from None
    end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"'{path}' is truncated: tensors need {8 + n + end} bytes, the file "
                              f"has {size}")
    return header, 8 + n


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-mapped read-only arrays for every tensor of a .safetensors file."""
    header, base = read_safetensors_header(path)
    out = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        if info['dtype'] not in _NP_DTYPES:
            raise CheckpointError(f"'{path}': tensor '{name}' has unsupported dtype {info['dtype']}")
        dtype = _NP_DTYPES[info['dtype']]
        b, e = info['data_offsets']
        shape = tuple(info['shape'])
        if (e - b) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"'{path}': tensor '{name}' size does not match its shape")
        if e == b:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode='r', offset=base + b, shape=shape)
    return out


def safetensors_metadata(path: str) -> Dict[str, str]:
    return read_safetensors_header(path)[0].get('__metadata__', {})


# ----------------------------------------------------------------------------------------
# Param trees
# ----------------------------------------------------------------------------------------

def flatten(tree: Mapping, sep: str = '/') -> Dict[str, Any]:
    out = {}

    def rec(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(f'{prefix}{sep}{k}' if prefix else str(k), v)
        else:
            out[prefix] = node
    rec('', tree)
    return out


def path_str(keypath, sep: str = '/') -> str:
    """A jax tree key path (DictKey/GetAttrKey/...) as the '/'-joined name `flatten` uses."""
    return sep.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in keypath)


def unflatten(flat: Mapping[str, Any], sep: str = '/') -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_params(path: str, params: Mapping, dtype=None, metadata=None) -> None:
    """Write a param tree to one .safetensors file (flat '/'-joined names)."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    entries = [(k, v.shape, dtype or v.dtype) for k, v in flat.items()]
    w = SafetensorsWriter(path, entries, metadata)
    for k, v in flat.items():
        w.write(k, v)
    w.close()


def load_params(path: str, dtype=None, shardings: Optional[Mapping] = None,
                expected: Optional[Mapping] = None):
    """Read a param tree from a .safetensors file.

    Args:
      dtype: cast floating leaves to this dtype (None keeps the stored dtype).
      shardings: optional tree (same structure) of `jax.sharding.Sharding`s: each device
        then reads only its own slice from the memory-mapped file.
      expected: optional tree of arrays/ShapeDtypeStructs; missing, unexpected or
        wrongly shaped leaves raise `CheckpointError` naming them.
    Returns:
      nested dict of jax arrays.
    """
    # lazy: jax (+0.4 s)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    if not os.path.isfile(path):
        raise CheckpointError(f"parameter file '{path}' does not exist")
    flat = load_safetensors(path)
    if expected is not None:
        exp = {k: tuple(v.shape) for k, v in flatten(expected).items()}
        missing = sorted(set(exp) - set(flat))
        extra = sorted(set(flat) - set(exp))
        wrong = sorted(k for k in set(exp) & set(flat) if tuple(flat[k].shape) != exp[k])
        if missing or extra or wrong:
            msg = [f"'{path}' does not match the model:"]
            if missing:
                msg.append(f'  missing {len(missing)}: {missing[:10]}')
            if extra:
                msg.append(f'  unexpected {len(extra)}: {extra[:10]}')
            if wrong:
                msg.append('  wrong shape: ' + ', '.join(
                    f'{k} {tuple(flat[k].shape)} != {exp[k]}' for k in wrong[:10]))
            raise CheckpointError('\n'.join(msg))
    flat_shard = flatten(shardings) if shardings is not None else {}

    def convert(name, a):
        floating = np.issubdtype(a.dtype, np.floating) or a.dtype == _BF16
        tgt = np.dtype(dtype) if dtype is not None and floating else a.dtype
        sh = flat_shard.get(name)
        if sh is None:
            return jnp.asarray(np.asarray(a).astype(tgt, copy=False))
        return jax.make_array_from_callback(
            a.shape, sh, lambda idx: np.asarray(a[idx]).astype(tgt, copy=False))

    return unflatten({k: convert(k, v) for k, v in flat.items()})


# ----------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it becomes `out` in one rename.

    A failure removes the temporary folder and leaves `out` untouched. An existing `out`
    is an error unless `overwrite`, and even then it is only removed after the new folder
    is complete.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output '{out}' already exists; choose another path or pass "
                              "overwrite=True (--overwrite)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f'{out}.tmp-{os.getpid()}-{int(time.time() * 1000)}'
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f'{out}.old-{os.getpid()}'
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def config_to_json(cfg) -> str:
    d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    return json.dumps(d, indent=1, sort_keys=True)


def write_checkpoint(out: str, model_config, parts: Mapping[str, Mapping], manifest=None,
                     overwrite: bool = False, dtype=None) -> str:
    """Save in-memory params (e.g. trained EMA weights) as a checkpoint folder."""
    with atomic_dir(out, overwrite) as tmp:
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            f.write(config_to_json(model_config))
        counts = {}
        for name, params in parts.items():
            if name not in _parts():
                raise CheckpointError(f"unknown part '{name}' (known: {_parts()})")
            save_params(os.path.join(tmp, f'{name}.safetensors'), params, dtype)
            counts[name] = int(sum(np.prod(np.shape(v)) for v in flatten(params).values()))
        m = dict(manifest or {})
        m.setdefault('parts', {}).update({k: {'params': v} for k, v in counts.items()})
        m.setdefault('format', 'vd_jax checkpoint v1')
        with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
            json.dump(m, f, indent=1, sort_keys=True)
    return out


def _parts() -> Tuple[str, ...]:
    # lazy: vd_jax.modalities pulls in jax (+0.5 s)
    from vd_jax import modalities  # noqa: PLC0415  # the registry names the parts (diffuser, vae_*, ctx_*)
    return modalities.PARTS


def read_config(ckpt: str):
    """The model config (ConfigDict) a checkpoint folder was made for.

    Configs written before vd_jax 0.2 have no `image_size` (default generation side); it
    is filled with the rule vd_jax 0.1 applied: 512 for the released AutoKL (trained at 256,
    generating at 512 as the demo), the VAE's resolution otherwise."""
    # lazy: ml_collections (+36 ms)
    import ml_collections  # noqa: PLC0415
    path = os.path.join(ckpt, 'config.json')
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"checkpoint folder '{ckpt}' does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"'{ckpt}' is not a vd_jax checkpoint folder (no config.json)")
    try:
        with open(path) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None
    if 'image_size' not in cfg and 'image' in cfg.get('vae', {}):
        res = int(cfg.vae.image.get('resolution', 256))
        cfg.image_size = 512 if res == 256 else res
    return cfg


def available_parts(ckpt: str) -> Tuple[str, ...]:
    return tuple(p for p in _parts() if os.path.isfile(os.path.join(ckpt, f'{p}.safetensors')))


def load_part(ckpt: str, part: str, dtype=None, shardings=None, expected=None):
    """Params of one part of a checkpoint folder; a clear error if it is absent."""
    if part not in _parts():
        raise CheckpointError(f"unknown part '{part}' (known: {_parts()})")
    path = os.path.join(ckpt, f'{part}.safetensors')
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{ckpt}' has no '{part}' weights ({part}.safetensors); "
                              f"it has: {list(available_parts(ckpt)) or 'nothing'}")
    return load_params(path, dtype=dtype, shardings=shardings, expected=expected)
