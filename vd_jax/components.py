"""The component layer: the networks of one model config with their parameters.

`Components` builds each network lazily (through `vd_jax.models.FAMILIES`, the part -> family
map of `vd_jax.modalities`) and gives, per modality, jitted

    encode_context(modality, raw)        prompts / token ids / images -> contexts (B, L, D)
    encode_latent(modality, raw, keys)   images / sentences -> latents
    decode_latent(modality, latents)     latents -> images in [0, 1] / sentences
    uncond_context(ctype, output, like)  the unconditional context of a convention

plus shapes (`abstract_params`, `latent_shape`) and the image sizes of the model. The sampling
pipeline (`vd_jax.tasks`) and training (`vd_jax.train.inputs`) both use it. With a `mesh`,
parameters are placed on it (replicated, or sharded by the logical-axis rules) and batches
can be split over its data axes (`shard_batch`). On a mesh of this process's devices the
encoders and decoders above split their batch over the data axes too (padded to a multiple
of `data_shards`, trimmed again), and every network runs under `on_mesh()` (the mesh and the
logical-axis rules the model's activation constraints resolve against).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import modalities as M
from vd_jax import sharding as shd
from vd_jax.batching import pad_rows, round_up, trim_rows
from vd_jax.models import family
from vd_jax.models.init import abstract_params


class Components:
    """Networks + parameters of one model config.

    Args:
      model_config: the `model` section of a config (or a whole config).
      params: {part: params} for the parts available ('diffuser', 'vae_image', ...).
      dtype: compute dtype of the networks ('float32' | 'bfloat16'); outputs stay float32.
      mesh: optional `jax.sharding.Mesh`; parameters are then placed on it by `rules`.
      rules: logical-axis rules (default `vd_jax.sharding.DEFAULT_RULES`), resolved against
        the axes the mesh has (`vd_jax.sharding.rules_for_mesh`); with a mesh whose
        fsdp/model axes are 1 or absent, parameters are replicated.

    Explicit caches, each holding one kind of thing: `jitted` (name -> jitted function),
    `samplers` (settings -> `Sampler`, filled by `vd_jax.tasks`), `tokenizers` (name ->
    tokenizer) and `uncond` (the unconditional contexts, computed once).
    """

    def __init__(self, model_config, params: Mapping[str, Any], *, dtype='float32',
                 mesh=None, rules=None):
        if 'model' in model_config:
            model_config = model_config['model']
        self.config = model_config
        self.dtype = jnp.dtype(dtype)
        if self.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.mesh = mesh
        self.rules = shd.normalize_rules(shd.DEFAULT_RULES if rules is None else rules)
        if mesh is not None:  # a user's mesh may have any subset of the axes, in any order
            self.rules = shd.rules_for_mesh(self.rules, mesh)
        self.params: Dict[str, Any] = {}
        self._modules: Dict[str, Any] = {}
        self.jitted: Dict[str, Callable] = {}
        self.samplers: Dict[Tuple, Any] = {}
        self.tokenizers: Dict[str, Any] = {}
        self.uncond: Dict[Tuple[str, str, str], jax.Array] = {}
        self.adapters = None  # LoRA adapters in use (`vd_jax.lora.stack.AdapterStack`)
        for part, tree in params.items():
            self.set_params(part, tree)

    # -- networks and parameters ------------------------------------------------------------------
    @property
    def parts(self) -> Tuple[str, ...]:
        """Parts the config defines."""
        return M.config_parts(self.config)

    def module(self, part: str):
        """The network of a part (built on first use)."""
        if part not in self._modules:
            kw = {}
            if part.startswith('vae_'):  # VD's latent_scale_factor of that modality
                scale = M.get(part[4:]).latent_scale_of(self.config)
                if scale is not None:
                    kw['latent_scale'] = scale
            self._modules[part] = family(M.part_family(part)).build(
                M.part_section(self.config, part), dtype=self.dtype, **kw)
        return self._modules[part]

    def abstract_params(self, parts: Optional[Sequence[str]] = None, boxed: bool = False
                        ) -> Dict[str, Any]:
        """{part: ShapeDtypeStructs} of the config's parts (no allocation)."""
        return {p: abstract_params(self.module(p), boxed=boxed) for p in (parts or self.parts)}

    def shardings(self, part: str):
        """NamedShardings of a part's parameters on the mesh (None without a mesh)."""
        if self.mesh is None:
            return None
        with nn.logical_axis_rules(self.rules):
            boxed = self.abstract_params([part], boxed=True)[part]
        return shd.logical_shardings(boxed, self.mesh, self.rules)

    def set_params(self, part: str, tree) -> None:
        """Use `tree` as the weights of `part` (placed on the mesh, if any)."""
        if part not in M.PARTS:
            raise ValueError(f"unknown part '{part}' (parts: {M.PARTS})")
        if self.mesh is not None:
            sh = self.shardings(part)
            tree = jax.tree_util.tree_map(lambda v, s: jax.device_put(v, s), tree, sh)
        self.params[part] = tree

    def jit(self, name: str, fn: Callable) -> Callable:
        """`jax.jit(fn)` (or fn, if already jitted), cached under `name` (fn must close over
        static things only)."""
        if name not in self.jitted:
            self.jitted[name] = fn if hasattr(fn, 'lower') else jax.jit(fn)
        return self.jitted[name]

    def tokenizer(self, name: str):
        """A tokenizer a modality's encoders use (text: 'clip' prompts -> ids, 'bert' / 'gpt2'
        for Optimus), built by its modality and checked against the model."""
        if name not in self.tokenizers:
            owner = next((m for m in M.MODALITIES.values()
                          if name in m.context_tokenizers + m.latent_tokenizers), None)
            if owner is None:
                raise KeyError(f"unknown tokenizer '{name}'")
            self.tokenizers[name] = owner.tokenizer(self, name)
        return self.tokenizers[name]

    def check_tokenizers(self, flows) -> None:
        """Build the tokenizers `flows` use (the context tokenizers of their context
        modalities, then the latent ones of their outputs: CLIP for text contexts, BERT and
        GPT-2 for text outputs): one that does not fit the model's vocabulary raises
        ValueError."""
        flows = [M.flow(f) for f in flows]
        names = [t for f in flows for t in M.get(f.ctype).context_tokenizers] + \
            [t for f in flows for t in M.get(f.xtype).latent_tokenizers]
        for name in dict.fromkeys(names):
            self.tokenizer(name)

    # -- modalities -----------------------------------------------------------------------------------
    def encode_context(self, modality: str, raw, **kw) -> jax.Array:
        """Raw inputs (prompts or token ids; images in [0, 1] / uint8 / paths) -> contexts
        (B, L, D) float32 (image kw: masks=[keep-mask or None per image])."""
        m = M.get(modality)
        inputs = m.context_inputs(self, raw, **kw)
        fn = self.jit(f'context/{modality}', _context_fn(m, self.module(m.ctx_part)))
        return self.run_split(lambda x: fn(self.params[m.ctx_part], x),
                              {k: jnp.asarray(v) for k, v in inputs.items()})

    def encode_latent(self, modality: str, raw, keys=None) -> jax.Array:
        """Raw inputs -> latents; with `keys` (one per input) a posterior sample per input
        (independent of the batch), else the posterior mean."""
        m = M.get(modality)
        inputs = {k: jnp.asarray(v) for k, v in m.latent_inputs(self, raw).items()}
        fn = _latent_fn(m, self.module(m.vae_part), keys is not None)
        fn = self.jit(f'latent/{modality}/{keys is not None}', fn)
        if keys is None:
            return self.run_split(lambda x: fn(self.params[m.vae_part], x, None), inputs)
        return self.run_split(lambda a: fn(self.params[m.vae_part], a[0], a[1]), (inputs, keys))

    def decode_latent(self, modality: str, latents, **kw):
        """Latents -> images (B, H, W, 3) float32 in [0, 1] / list of sentences."""
        m = M.get(modality)
        seeds = kw.pop('seeds', None)
        if seeds is None:
            return self.run_split(lambda z: m.decode(self, z, **kw), jnp.asarray(latents))
        # per-row decoding seeds are batch-leading too
        return self.run_split(lambda a: m.decode(self, a[0], seeds=np.asarray(a[1]), **kw),
                              (jnp.asarray(latents), np.asarray(seeds)))

    def uncond_context(self, ctype: str, output: str, convention: str, like) -> jax.Array:
        """The unconditional context for contexts `like` (B, L, D) of modality `ctype` when
        generating `output`; multi-image contexts (L a multiple of one context) are tiled."""
        if convention not in M.CONVENTIONS:
            raise ValueError(f'uncond convention must be one of {M.CONVENTIONS}, got {convention!r}')
        u = M.get(ctype).uncond(convention, output)
        if u.zeros:
            return jnp.zeros_like(like)
        key = (ctype, output, convention)
        if key not in self.uncond:
            self.uncond[key] = self.encode_context(ctype, u.raw)
        c = self.uncond[key]
        if c.shape[1] != like.shape[1]:
            c = jnp.tile(c, (1, like.shape[1] // c.shape[1], 1))
        return jnp.repeat(c, like.shape[0], axis=0)

    # -- shapes and sizes ----------------------------------------------------------------------------
    def latent_shape(self, modality: str, batch: int, hw=None) -> Tuple[int, ...]:
        return M.get(modality).latent_shape(self.config, batch, hw)

    @property
    def image_size(self) -> int:
        """Default generation side in pixels (config `image_size`)."""
        if 'image_size' not in self.config:
            raise ValueError("the model config has no 'image_size' (the default generation "
                             'size); add it to the config')
        return int(self.config['image_size'])

    @property
    def vae_factor(self) -> int:
        """Pixels per image-latent cell (8 for kl-f8)."""
        return self.module('vae_image').config.downsample_factor if 'vae_image' in self.parts \
            else 2 ** (len(self.config['vae']['image']['ch_mult']) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor x 2^(diffuser levels - 1)."""
        levels = len(self.config['diffuser']['streams']['image']['channel_mult'])
        return self.vae_factor * 2 ** (levels - 1)

    # -- batches on the mesh -------------------------------------------------------------------------
    @property
    def data_shards(self) -> int:
        """How many ways a batch is split (the mesh's batch axes; 1 without a mesh)."""
        if self.mesh is None:
            return 1
        return shd.batch_shards(self.mesh, self.rules)

    def shard_batch(self, tree):
        """Place batch-leading arrays split over the mesh's batch axes (identity without a
        mesh). Batches must be padded to a multiple of `data_shards` first."""
        if self.mesh is None:
            return tree

        def put(x):
            x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
            if not x.ndim:
                return jax.device_put(x, shd.replicated(self.mesh))
            return jax.device_put(x, shd.batch_sharding(self.mesh, self.rules, x.ndim))
        return jax.tree_util.tree_map(put, tree)

    @property
    def splits_batches(self) -> bool:
        """Whether sampling splits its batches over the mesh: a mesh of this process's
        devices only (a mesh spanning several processes holds global arrays, which the
        host-side sampling code cannot read; training's encoders use their own program)."""
        return self.mesh is not None and not self.mesh.is_multi_process

    def on_mesh(self):
        """Context for running (tracing) the networks: `jax.set_mesh(mesh)` and the
        logical-axis rules, so the model's `with_logical_constraint`s resolve against this
        mesh (a no-op context without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def run_split(self, fn: Callable, batch):
        """`fn(batch)` for a pytree of batch-leading arrays: with a mesh of this process's
        devices the batch is padded (last row repeated) to a multiple of `data_shards`, split
        over the data axes, run under `on_mesh()` and the batch-leading outputs trimmed."""
        if not self.splits_batches:  # no mesh, or a multi-process one: as given
            return fn(batch)
        b = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
        padded = round_up(b, self.data_shards)
        with self.on_mesh():
            out = fn(self.shard_batch(pad_rows(batch, b, padded)))
        return out if padded == b else trim_rows(out, b)


# Compiled functions shared by every `Components` of equal networks (networks are hashable):
# a training process that builds its encoders several times compiles them once.
@functools.lru_cache(maxsize=None)
def _context_fn(m, module):
    return jax.jit(lambda p, x: m.context(module, p, x))


@functools.lru_cache(maxsize=None)
def _latent_fn(m, module, per_key: bool):
    if not per_key:
        return jax.jit(lambda p, x, keys: m.encode(module, p, x))

    def one_each(p, x, ks):  # one posterior draw per input, independent of the batch
        return jax.vmap(lambda xi, k: m.encode(
            module, p, jax.tree_util.tree_map(lambda a: a[None], xi), k)[0])(x, ks)
    return jax.jit(one_each)
