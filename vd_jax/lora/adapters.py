"""LoRA adapters of the diffuser: which weights they adapt, their files, and merging.

A LoRA adapter replaces a weight W (a Dense kernel (in, out), or a conv kernel (k, k, in, out)
seen as the matrix (k*k*in, out)) by

    W + scale * (alpha / r) * down @ up,        down (in, r), up (r, out)

(Hu et al. 2021; `down` is PEFT's lora_A transposed, `up` its lora_B transposed). `up` starts
at zero, so a fresh adapter is the base model exactly.

Targets are chosen by glob patterns (`fnmatch`, `*` also crosses '/') over the '/'-joined
parameter paths of the diffuser's kernels, e.g. `text/context_blocks_3/transformer_blocks_0/
attn2/to_k/kernel`. VD's data layers (ResBlocks, FCBlocks) have no attention: the SD-style
self-attention (`attn1`) and cross-attention (`attn2`) both live in the context layers'
transformers, so `DEFAULT_TARGETS` adapts q, k, v and out of both, in every context layer.
Rank and alpha are set per stream (the first path component: 'image', 'text'); rank 0 leaves
a stream's weights alone.

An adapter file is one safetensors file: tensors `<module path>/lora_down` and
`<module path>/lora_up` (float32), and in its metadata `vd_jax_lora` a JSON record of how it
was made (format version, ranks, alphas, target patterns, base model, training settings) plus
any per-module alpha (`module_alpha`, imported files). `load_adapter` checks it against a model
before anything runs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from vd_jax.checkpoint import flatten, load_safetensors, safetensors_metadata, save_params, unflatten
from vd_jax.errors import CheckpointError, ConfigError

FORMAT = 'vd_jax-lora'
FORMAT_VERSION = 1
METADATA_KEY = 'vd_jax_lora'
DEFAULT_TARGETS = ('*/context_blocks_*/transformer_blocks_*/attn[12]/to_[qkv]/kernel',
                   '*/context_blocks_*/transformer_blocks_*/attn[12]/to_out_0/kernel')
DOWN, UP = 'lora_down', 'lora_up'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Where adapters go and their rank / alpha per stream (hashable: a static jit argument).

    targets: glob patterns over kernel paths; ranks / alphas: ((stream, value), ...)."""
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    ranks: Tuple[Tuple[str, int], ...] = (('image', 4), ('text', 4))
    alphas: Tuple[Tuple[str, float], ...] = (('image', 4.0), ('text', 4.0))

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> 'LoraSpec':
        """From a config section {'targets': [...], 'rank': {stream: r}, 'alpha': {stream: a}}
        (a single number applies to every stream; alpha defaults to the rank)."""
        s = dict(section)
        targets = s.get('targets') or DEFAULT_TARGETS
        targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        rank = s.get('rank', 4)
        rank = {'*': rank} if isinstance(rank, (int, float)) else dict(rank)
        alpha = s.get('alpha', None)
        alpha = {k: v for k, v in rank.items()} if alpha is None else \
            ({'*': alpha} if isinstance(alpha, (int, float)) else dict(alpha))
        for k, v in rank.items():
            if isinstance(v, bool) or int(v) != v or int(v) < 0:
                raise ConfigError(f'lora.rank.{k} = {v!r}: ranks are integers >= 0')
        for k, v in alpha.items():
            if not float(v) > 0:
                raise ConfigError(f'lora.alpha.{k} = {v!r}: alphas must be > 0')
        return cls(targets=targets, ranks=tuple(sorted((str(k), int(v)) for k, v in rank.items())),
                   alphas=tuple(sorted((str(k), float(v)) for k, v in alpha.items())))

    def _of(self, table, stream: str, what: str):
        d = dict(table)
        if stream in d:
            return d[stream]
        if '*' in d:
            return d['*']
        raise ConfigError(f"lora.{what} has no value for stream '{stream}' (set lora.{what}."
                          f'{stream}, or one number for every stream)')

    def rank(self, stream: str) -> int:
        return int(self._of(self.ranks, stream, 'rank'))

    def alpha(self, stream: str) -> float:
        return float(self._of(self.alphas, stream, 'alpha'))

    def as_json(self) -> Dict[str, Any]:
        return {'targets': list(self.targets), 'rank': dict(self.ranks),
                'alpha': dict(self.alphas)}


def _matrix_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """(fan_in, fan_out) of a kernel: Dense (in, out), conv (k, k, in, out)."""
    return int(np.prod(shape[:-1])), int(shape[-1])


def select_targets(params: Mapping, spec: LoraSpec) -> Dict[str, Tuple[int, int]]:
    """{kernel path: (fan_in, fan_out)} of the kernels `spec` adapts (rank > 0 streams).

    A pattern that matches no kernel, or matches a non-kernel (a bias, a norm scale), is an
    error naming it: a typo must not silently train nothing."""
    flat = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    out: Dict[str, Tuple[int, int]] = {}
    for pat in spec.targets:
        hits = [k for k in flat if fnmatch.fnmatchcase(k, pat)]
        if not hits:
            examples = [k for k in flat if k.endswith('/kernel')][:5]
            raise ConfigError(f"lora target pattern '{pat}' matches no diffuser parameter "
                              f'(paths look like {examples})')
        bad = [k for k in hits if not k.endswith('/kernel') or len(flat[k]) not in (2, 4)]
        if bad:
            raise ConfigError(f"lora target pattern '{pat}' matches {bad[:5]}: LoRA adapts "
                              'Dense kernels (in, out) and conv kernels (k, k, in, out) only')
        for k in hits:
            if spec.rank(k.split('/')[0]) > 0:
                out[k] = _matrix_shape(flat[k])
    if not out:
        raise ConfigError(f'lora: every matched stream has rank 0 (ranks {dict(spec.ranks)})')
    return dict(sorted(out.items()))


def module_of(kernel_path: str) -> str:
    """'a/b/to_q/kernel' -> 'a/b/to_q' (adapter tensors are named after the module)."""
    if not kernel_path.endswith('/kernel'):
        raise ConfigError(f"'{kernel_path}' is not a kernel path")
    return kernel_path[:-len('/kernel')]


@dataclasses.dataclass
class Adapter:
    """One LoRA adapter: {module path: (down (in, r), up (r, out))} float32 numpy, the alpha
    of each module, and the record written into its file (`info`)."""
    weights: Dict[str, Tuple[np.ndarray, np.ndarray]]
    alphas: Dict[str, float]
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def factor(self, module: str) -> float:
        """alpha / r of a module."""
        return float(self.alphas[module]) / self.weights[module][0].shape[1]

    def delta(self, module: str) -> np.ndarray:
        """(alpha / r) down @ up: the (in, out) change at scale 1."""
        down, up = self.weights[module]
        return self.factor(module) * (down.astype(np.float64) @ up.astype(np.float64))

    @property
    def num_params(self) -> int:
        return int(sum(d.size + u.size for d, u in self.weights.values()))

    def as_tree(self) -> Dict[str, Any]:
        """The nested training tree {.. module: {lora_down, lora_up}}."""
        flat = {}
        for m, (d, u) in self.weights.items():
            flat[f'{m}/{DOWN}'], flat[f'{m}/{UP}'] = d, u
        return unflatten(flat)

    @classmethod
    def from_tree(cls, tree: Mapping, spec: LoraSpec, info=None) -> 'Adapter':
        """From a training tree (nested dict of {lora_down, lora_up}) with the spec's alphas."""
        flat = {k: np.asarray(v, np.float32) for k, v in flatten(tree).items()}
        mods = sorted({k.rsplit('/', 1)[0] for k in flat})
        weights = {m: (flat[f'{m}/{DOWN}'], flat[f'{m}/{UP}']) for m in mods}
        return cls(weights, {m: spec.alpha(m.split('/')[0]) for m in mods}, dict(info or {}))


def init_tree(targets: Mapping[str, Tuple[int, int]], spec: LoraSpec, seed: int = 0):
    """A fresh training tree: down ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch/PEFT's kaiming
    uniform with a=sqrt(5)), up = 0 (so the adapted model starts as the base)."""
    flat = {}
    for i, (k, (fan_in, fan_out)) in enumerate(sorted(targets.items())):
        r = spec.rank(k.split('/')[0])
        rng = np.random.default_rng([seed, i])
        b = 1.0 / np.sqrt(fan_in)
        m = module_of(k)
        flat[f'{m}/{DOWN}'] = rng.uniform(-b, b, (fan_in, r)).astype(np.float32)
        flat[f'{m}/{UP}'] = np.zeros((r, fan_out), np.float32)
    return unflatten(flat)


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------

# Storage dtypes of an adapter file (`lora.save_dtype`): float16 halves the file (diffusers
# and PEFT share LoRAs in float16 too); read_adapter always computes in float32.
SAVE_DTYPES = ('float32', 'float16')


def check_save_dtype(dtype: str, key: str = 'lora.save_dtype') -> str:
    """`dtype` if it is one of SAVE_DTYPES, else a ConfigError naming `key`."""
    if str(dtype) not in SAVE_DTYPES:
        raise ConfigError(f'{key} = {dtype!r}: adapter files are stored as one of {SAVE_DTYPES}')
    return str(dtype)


def save_adapter(path: str, adapter: Adapter, dtype: str = 'float32') -> str:
    """Write one adapter file (tensors in `dtype`, one of SAVE_DTYPES, + the `vd_jax_lora`
    metadata record); returns path."""
    dt = np.dtype(check_save_dtype(dtype, 'dtype'))
    stream_alpha: Dict[str, set] = {}
    for m, a in adapter.alphas.items():
        stream_alpha.setdefault(m.split('/')[0], set()).add(float(a))
    info = dict(adapter.info, format=FORMAT, version=FORMAT_VERSION,
                num_params=adapter.num_params,
                rank={s: sorted({d.shape[1] for m, (d, _) in adapter.weights.items()
                                 if m.split('/')[0] == s}) for s in stream_alpha})
    if any(len(v) > 1 for v in stream_alpha.values()):
        info['module_alpha'] = {m: float(a) for m, a in adapter.alphas.items()}
    else:
        info['alpha'] = {s: next(iter(v)) for s, v in stream_alpha.items()}
        info.pop('module_alpha', None)
    tree = {f'{m}/{DOWN}': np.asarray(d, dt) for m, (d, _) in adapter.weights.items()}
    tree.update({f'{m}/{UP}': np.asarray(u, dt) for m, (_, u) in adapter.weights.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    save_params(tmp, tree, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)
    return path


def read_adapter(path: str) -> Adapter:
    """Read a vd_jax adapter file (see the module docstring); a PEFT/diffusers file is
    refused here with a pointer to `vd_jax.lora.peft_import`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file '{path}' does not exist")
    meta = safetensors_metadata(path)
    flat = {k: np.asarray(v, np.float32) for k, v in load_safetensors(path).items()}
    if METADATA_KEY not in meta:
        raise CheckpointError(f"'{path}' is not a vd_jax LoRA file (no '{METADATA_KEY}' metadata); "
                              'read diffusers/PEFT files with vd_jax.lora.import_peft (load_lora does '
                              'it for you)')
    info = json.loads(meta[METADATA_KEY])
    if info.get('format') != FORMAT or int(info.get('version', 0)) > FORMAT_VERSION:
        raise CheckpointError(f"'{path}': unsupported LoRA format {info.get('format')!r} version "
                              f"{info.get('version')!r} (this vd_jax reads {FORMAT} <= {FORMAT_VERSION})")
    mods = sorted({k.rsplit('/', 1)[0] for k in flat})
    weights = {}
    for m in mods:
        d, u = flat.get(f'{m}/{DOWN}'), flat.get(f'{m}/{UP}')
        if d is None or u is None or d.ndim != 2 or u.ndim != 2 or d.shape[1] != u.shape[0]:
            raise CheckpointError(f"'{path}': module '{m}' needs {DOWN} (in, r) and {UP} (r, out), got "
                                  f'{None if d is None else d.shape} and {None if u is None else u.shape}')
        weights[m] = (d, u)
    alphas = {}
    for m in mods:
        if 'module_alpha' in info:
            alphas[m] = float(info['module_alpha'][m])
        else:
            alphas[m] = float(info['alpha'][m.split('/')[0]])
    return Adapter(weights, alphas, info)


def check_against(adapter: Adapter, params: Mapping, where: str = 'adapter') -> None:
    """Every adapted module must be a kernel of `params` with matching (in, out)."""
    flat = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing, wrong = [], []
    for m, (d, u) in adapter.weights.items():
        k = f'{m}/kernel'
        if k not in flat:
            missing.append(k)
        elif _matrix_shape(flat[k]) != (d.shape[0], u.shape[1]):
            wrong.append(f'{k} {_matrix_shape(flat[k])} != adapter ({d.shape[0]}, {u.shape[1]})')
    if missing or wrong:
        raise CheckpointError(f'{where} does not fit this diffuser: ' +
                              (f'no such parameter(s) {missing[:8]}' if missing else '') +
                              ('; ' if missing and wrong else '') +
                              (f"wrong shape(s): {'; '.join(wrong[:8])}" if wrong else ''))


# ------------------------------------------------------------------------------------------
# Merging (jittable: scales are traced)
# ------------------------------------------------------------------------------------------

def merge(params, stacks: Sequence[Mapping[str, Tuple[Any, Any]]], scales):
    """params with sum_k scales[k] * down_k @ up_k added to each adapted kernel.

    stacks[k]: {module: (down (in, r), up (r, out) already times alpha / r)} of adapter k
    (`sampling_weights`); scales: (K,) array (traced under jit: a new scale is a new value,
    not a new program). The sum is float32; the result keeps each kernel's dtype."""
    # lazy: jax (+0.6 s)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    flat = flatten(params)
    out = dict(flat)
    for k, weights in enumerate(stacks):
        for m, (down, up) in weights.items():
            key = f'{m}/kernel'
            w = out[key]
            d = (scales[k] * jnp.dot(down.astype(jnp.float32), up.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST)).reshape(w.shape)
            out[key] = (w.astype(jnp.float32) + d).astype(flat[key].dtype)
    return unflatten(out)


def sampling_weights(adapter: Adapter, dtype=np.float32) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{module: (down, up * alpha / r)}: the form `merge` and the on-the-fly path read."""
    return {m: (np.asarray(d, dtype), np.asarray(u * adapter.factor(m), dtype))
            for m, (d, u) in adapter.weights.items()}


def summary(adapter: Adapter) -> str:
    streams = sorted({m.split('/')[0] for m in adapter.weights})
    return (f'{len(adapter.weights)} modules in {streams}, {adapter.num_params:,} parameters '
            f'({adapter.num_params * 4 / 1e6:.2f} MB float32)')


def file_size_mb(path: Optional[str]) -> float:
    return os.path.getsize(path) / 1e6 if path and os.path.isfile(path) else float('nan')

