"""The adapters loaded into one model (`VersatileDiffusion.load_lora` and friends).

`AdapterStack` keeps {name: adapter, scale} in load order and gives the sampling code
(`vd_jax.tasks.common`) the diffuser and parameters to run:

  mode 'merge' (default, the fast path): the samplers get the base parameters plus
    sum_k scale_k (alpha/r) down_k @ up_k, computed by one jitted merge (scales are traced: a
    new scale re-runs the merge, it does not recompile it, and the sampler sees new parameter
    values of the same shapes). Sampling costs what the base costs.
  mode 'on_the_fly': the base parameters stay as they are and each adapted layer adds its
    low-rank path (`vd_jax.lora.apply.LoraDiffuser`); scales are traced arguments of the
    sampler itself.
Either way the base weights (`components.params['diffuser']`) are never modified, so unloading
gives the base model back exactly.
"""
from __future__ import annotations

import collections
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.checkpoint import safetensors_metadata
from vd_jax.errors import CheckpointError, ConfigError
from vd_jax.lora.adapters import Adapter, check_against, merge, sampling_weights, summary
from vd_jax.lora.adapters import METADATA_KEY, read_adapter
from vd_jax.lora.peft_import import read_peft_file

MODES = ('merge', 'on_the_fly')


def _check_scale(name: str, scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"LoRA '{name}': scale must be a number, got {scale!r}") from None
    if not np.isfinite(s):
        raise ConfigError(f"LoRA '{name}': scale must be finite, got {scale!r}")
    return s


class AdapterStack:
    """Adapters of one `Components` (`components.adapters`), see the module docstring."""

    def __init__(self, comps, mode: str = 'merge'):
        self.comps = comps
        self.adapters: 'collections.OrderedDict[str, Adapter]' = collections.OrderedDict()
        self.scales: Dict[str, float] = {}
        self.sources: Dict[str, str] = {}
        self._mode = 'merge'
        self.mode = mode
        self._device = None     # [ {module: (down, up)} per adapter ] on the device(s)
        self._merged = None     # (scales, merged params, base) of the last merge
        self._merge_fn = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ConfigError(f'LoRA mode must be one of {MODES}, got {value!r}')
        self._mode = value
        self._merged = None

    @property
    def active(self) -> bool:
        return bool(self.adapters)

    def add(self, name: str, adapter: Adapter, scale: float = 1.0, source: str = '') -> str:
        if not isinstance(name, str) or not name:
            raise ConfigError(f'a LoRA name must be a non-empty string, got {name!r}')
        if name in self.adapters:
            raise ConfigError(f"a LoRA named '{name}' is already loaded (loaded: "
                              f'{list(self.adapters)}); unload it first or pass another name=')
        if 'diffuser' not in self.comps.params:
            raise CheckpointError('this model has no diffuser weights to adapt')
        check_against(adapter, self.comps.params['diffuser'], f"LoRA '{name}' ({source or 'memory'})")
        s = _check_scale(name, scale)
        self.adapters[name] = adapter
        self.scales[name] = s
        self.sources[name] = source
        self._device = self._merged = None
        return name

    def remove(self, name: Optional[str] = None) -> None:
        """Unload one adapter, or all with name None."""
        if name is None:
            self.adapters.clear()
            self.scales.clear()
            self.sources.clear()
        else:
            if name not in self.adapters:
                raise ConfigError(f"no LoRA named '{name}' is loaded (loaded: {list(self.adapters)})")
            del self.adapters[name], self.scales[name], self.sources[name]
        self._device = self._merged = None

    def set_scale(self, name: str, scale) -> None:
        if name not in self.adapters:
            raise ConfigError(f"no LoRA named '{name}' is loaded (loaded: {list(self.adapters)})")
        self.scales[name] = _check_scale(name, scale)

    def listing(self):
        """[(name, scale, source, summary)] in load order."""
        return [(n, self.scales[n], self.sources[n], summary(a)) for n, a in self.adapters.items()]

    # -- what the samplers run -----------------------------------------------------------------
    def _put(self, x):
        x = jnp.asarray(x)
        if self.comps.mesh is None:
            return x
        # lazy: vd_jax.sharding pulls in jax, flax (+0.1 s)
        from vd_jax import sharding as shd  # noqa: PLC0415
        return jax.device_put(x, shd.replicated(self.comps.mesh))

    def _weights(self):
        if self._device is None:  # float32 whatever the compute dtype: merged in float32
            self._device = [{m: (self._put(d), self._put(u)) for m, (d, u) in
                             sampling_weights(a, np.float32).items()}
                            for a in self.adapters.values()]
        return self._device

    def _scales(self):
        return self._put(np.asarray([self.scales[n] for n in self.adapters], np.float32))

    def wrap(self, diffuser):
        """The diffuser module a conditioning runs (the on-the-fly wrapper in that mode)."""
        if not self.active or self.mode == 'merge':
            return diffuser
        # lazy: vd_jax.lora.apply pulls in jax, flax (+0.3 s)
        from vd_jax.lora.apply import LoraDiffuser  # noqa: PLC0415
        return LoraDiffuser(diffuser)

    def sampling_params(self, base):
        """The params matching `wrap`: merged base, or {'base', 'lora'}."""
        if not self.active:
            return base
        if self.mode == 'on_the_fly':
            return {'base': base, 'lora': {'weights': self._weights(), 'scales': self._scales()}}
        key = tuple(self.scales[n] for n in self.adapters)
        # new base weights (components.set_params) are merged again
        if self._merged is None or self._merged[0] != key or self._merged[2] is not base:
            if self._merge_fn is None:
                out_sh = None
                if self.comps.mesh is not None:
                    out_sh = jax.tree_util.tree_map(lambda a: a.sharding, base)
                self._merge_fn = jax.jit(merge, out_shardings=out_sh)
            self._merged = (key, self._merge_fn(base, self._weights(), self._scales()), base)
        return self._merged[1]


def parse_lora_flag(spec: str):
    """'PATH[:SCALE]' (sample.py --lora) -> (path, scale); the file must exist."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(':')
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not os.path.isfile(path):
        raise CheckpointError(f"'{path}' does not exist (give PATH or PATH:SCALE, e.g. star.safetensors:0.8)")
    return path, _check_scale(path, scale)


def stack_of(comps) -> AdapterStack:
    """The components' adapter stack (created on first use)."""
    if getattr(comps, 'adapters', None) is None:
        comps.adapters = AdapterStack(comps)
    return comps.adapters


def read_any(path: str, comps, **import_kw) -> Adapter:
    """A vd_jax adapter file, or a diffusers/PEFT LoRA file mapped onto this diffuser."""
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file '{path}' does not exist")
    if not path.endswith('.safetensors'):
        raise CheckpointError(f"LoRA file '{path}': expected a .safetensors file")
    if METADATA_KEY in safetensors_metadata(path):
        if import_kw:
            raise ConfigError(f"'{path}' is a vd_jax LoRA file: {sorted(import_kw)} only apply to "
                              'diffusers/PEFT files')
        return read_adapter(path)
    return read_peft_file(path, comps.config['diffuser'], **import_kw)
