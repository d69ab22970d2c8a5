"""Versatile Diffusion end to end: every flow and application as jitted batch samplers.

    from vd_jax.pipeline import VersatileDiffusion
    vd = VersatileDiffusion.from_checkpoint('converted/vd4')        # or .random('tiny')
    images = vd.text_to_image(['a red bicycle'], n=4, seed=0)        # (4, 512, 512, 3) in [0, 1]
    texts = vd.image_to_text('cat.jpg', n=4)                         # list of 4 strings

A thin facade: the networks live in `vd_jax.components.Components` (`vd.components`:
encode_context / encode_latent / decode_latent per modality), each task in its own module of
`vd_jax.tasks`. Every task runs its whole denoising loop as one compiled program
per (conditioning, shapes, steps, sampler); new prompts, images or seeds of the same shapes
reuse it. Sample i of a call is seeded with `seed + i` and does not depend on the batch it is
in. Images are float32 arrays (B, H, W, 3) in [0, 1], channels-last.

Sampling keywords of every task: steps (50), scale (7.5, or what the model's config
recommends: `vd.sampling_defaults`), sampler ('ddim' | 'ddpm' | 'dpm++' | 'euler' |
'euler_a'), eta, seed, spacing, karras, guidance_rescale, dtype
(`vd_jax.tasks.SamplingOptions`); plus progress (True or a callable(done, total)),
callback(step, latents) and latents (initial x_T). The schedule and what the model predicts
come from the checkpoint's config (`model.schedule`).

Unconditional (negative) contexts follow the v1.0 demo by default (`uncond='v1.0'`): the
empty prompt for text, a zero context for image contexts of image outputs, and the CLIP
context of an all-black image for image->text. `uncond='legacy'` (Nov-2022 CLI) and
`'diffusers'` use the CLIP context of a mid-gray image for every image context.
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vd_jax import modalities as M
from vd_jax.checkpoint import available_parts, load_part, read_config
from vd_jax.components import Components
from vd_jax.config import load_config
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.errors import CheckpointError, InputError
from vd_jax.lora.stack import read_any, stack_of
from vd_jax.models.init import random_params
from vd_jax.platform import warn_cpu_bfloat16
from vd_jax.sharding import as_mesh, parse_mesh  # noqa: F401  (re-exported)
from vd_jax.tasks import TASKS, SamplingOptions  # noqa: F401  (re-exported)

UNCOND_CONVENTIONS = M.CONVENTIONS
# Models shipped in the package: name -> checkpoint folder (None: random weights of that config)
_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
MODELS = {'vd-mini': os.path.join(_WEIGHTS, 'vd_mini'), 'tiny': None}
DEFAULT_MODEL = 'vd-mini'


class VersatileDiffusion:
    """Versatile Diffusion with its VAEs and context encoders, ready to sample.

    Args:
      model_config: the `model` section of a config (or the whole config).
      params: {part: params} for the parts available ('diffuser', 'vae_image', 'vae_text',
        'ctx_image', 'ctx_text'); tasks that need a missing part raise a clear error.
      dtype: compute dtype ('float32' | 'bfloat16'); sampler state and outputs stay float32.
        bfloat16 on a CPU backend warns (`vd_jax.platform.CpuBfloat16Warning`): slower there.
      uncond: unconditional-context convention, one of `UNCOND_CONVENTIONS`.
      source: where the weights came from (recorded by `sample.py`).
      mesh: optional device mesh (see `as_mesh`: a `jax.sharding.Mesh` with any of the axes
        data / fsdp / model in any order, {axis: size} or
        'data=2,fsdp=4' over this process's devices): every batch is split over its data
        axes (padded to a multiple of them and trimmed), parameters are replicated, or
        sharded over fsdp/model by `rules`, for chips that cannot hold the whole model.
        Sample i is the same as without a mesh (up to float summation order).
      rules: logical-axis rules (default `vd_jax.sharding.DEFAULT_RULES`, as training).
    """

    def __init__(self, model_config, params: Mapping[str, Any], *, dtype='float32',
                 uncond: str = 'v1.0', source: str = '<memory>', mesh=None, rules=None):
        if uncond not in UNCOND_CONVENTIONS:
            raise InputError(f'uncond must be one of {UNCOND_CONVENTIONS}, got {uncond!r}')
        self.components = Components(model_config, params, dtype=dtype, mesh=as_mesh(mesh),
                                     rules=rules)
        warn_cpu_bfloat16(self.components.dtype, self.components.mesh)
        self.config, self.uncond, self.source = self.components.config, uncond, source

    @property
    def params(self):
        return self.components.params

    @property
    def schedule(self):
        return make_schedule(self.config['schedule'])

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, *, dtype='float32', parts: Optional[Sequence[str]] = None,
                        uncond: str = 'v1.0', mesh=None, rules=None) -> 'VersatileDiffusion':
        """Load a vd_jax checkpoint folder (made by `python -m vd_jax.convert` or training).
        Weights are read straight into their place (each device reads its own slice with a
        mesh) and stored in the compute dtype. mesh / rules: as the constructor."""
        cfg = read_config(path)
        have = available_parts(path)
        want = have if parts is None else tuple(parts)
        missing = [p for p in want if p not in have]
        if missing:
            raise CheckpointError(f"checkpoint '{path}' has no {missing} (it has {list(have)})")
        vd = cls(cfg, {}, dtype=dtype, uncond=uncond, source=path, mesh=mesh, rules=rules)
        for p in want:
            vd.components.params[p] = load_part(path, p, dtype=dtype,
                                                shardings=vd.components.shardings(p))
        return vd

    @classmethod
    def default(cls, name: str = DEFAULT_MODEL, **kw) -> 'VersatileDiffusion':
        """A model shipped in the package, by name (`MODELS`): 'vd-mini' (the default: the
        whole VD trained here on the shapes world, docs/vd-mini.md), or 'tiny' (the tiny
        config with random weights, what tests use). Keywords as `from_checkpoint`."""
        if name not in MODELS:
            raise CheckpointError(f"unknown model '{name}'; shipped models: {sorted(MODELS)}")
        if MODELS[name] is None:
            seed = kw.pop('seed', 0)
            return cls.random(name, seed, **kw)
        return cls.from_checkpoint(MODELS[name], **kw)

    @classmethod
    def random(cls, config='tiny', seed: int = 0, *, dtype='float32', uncond: str = 'v1.0',
               mesh=None, rules=None) -> 'VersatileDiffusion':
        """Every part with random (untrained) weights: a smoke test of the whole install."""
        cfg = load_config(config) if isinstance(config, str) else config
        vd = cls(cfg, {}, dtype=dtype, uncond=uncond, source=f'random:{config}:{seed}',
                 mesh=mesh, rules=rules)
        for i, (part, tree) in enumerate(sorted(vd.abstract_params().items())):
            vd.components.set_params(part, random_params(tree, seed + i))
        return vd

    def abstract_params(self):
        """Shapes of every part the config defines, without allocating."""
        return self.components.abstract_params()

    # -- LoRA adapters (vd_jax.lora) --------------------------------------------------------------
    def load_lora(self, path: str, scale: float = 1.0, name: Optional[str] = None,
                  **import_kw) -> str:
        """Load a LoRA adapter of the diffuser and use it from the next call on; returns its
        name (default: the file name without '.safetensors'). Several adapters add up, each
        with its own scale. `path`: a vd_jax adapter file (train.py's LoRA export) or a
        diffusers/PEFT LoRA file (`import_kw`: see `vd_jax.lora.import_peft`)."""
        adapter = read_any(path, self.components, **import_kw)
        name = name or os.path.basename(path)[:-len('.safetensors')]
        return stack_of(self.components).add(name, adapter, scale, source=path)

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Unload one adapter by name, or every adapter (name None): the base model again."""
        stack_of(self.components).remove(name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change an adapter's scale (0 = off); the compiled samplers are reused."""
        stack_of(self.components).set_scale(name, scale)

    @property
    def loras(self) -> dict:
        """{name: scale} of the loaded adapters, in load order."""
        a = self.components.adapters
        return {} if a is None else {n: a.scales[n] for n in a.adapters}

    @property
    def lora_mode(self) -> str:
        """'merge' (adapters merged into the weights: the fast path) or 'on_the_fly'."""
        a = self.components.adapters
        return 'merge' if a is None else a.mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        stack_of(self.components).mode = mode

    # -- checks -----------------------------------------------------------------------------------
    def check_task(self, task: str) -> None:
        """Raise `InputError` naming what this model lacks for `task`."""
        if task not in TASKS:
            raise InputError(f"unknown task '{task}'; tasks: {sorted(TASKS)}")
        t = TASKS[task]
        missing = sorted(p for p in t.parts if p not in self.params)
        if missing:
            raise InputError(f"task '{task}' needs the parts {list(t.parts)}; this model "
                             f'({self.source}) lacks {missing} (it has {sorted(self.params)}). '
                             'Convert them (python -m vd_jax.convert) or use a task these parts '
                             'support.')
        have = {f.name for f in M.model_flows(self.config)}
        for f in t.flows:
            if f not in have:
                fl = M.flow(f)
                raise InputError(f"task '{task}' needs the {fl.ctype}->{fl.xtype} flow, which the "
                                 f"diffuser '{self.config.get('name', '?')}' does not have "
                                 f'(its flows: {sorted(have)})')
        try:  # tokenizers that do not fit the model's vocabularies fail before any sampling
            self.components.check_tokenizers(t.flows)
        except CheckpointError:  # a vocabulary file that is missing or malformed
            raise
        except ValueError as e:
            raise InputError(f"task '{task}': {e}") from None

    @property
    def sampling_defaults(self) -> dict:
        """The sampling options of a call that gives none: `SamplingOptions`'s defaults (VD's)
        with what the model's config recommends over them (its `sampling` section, e.g.
        VD-mini v3's guidance scale 3), e.g. {'scale': 3.0, 'steps': 50, ...}."""
        base = {f: getattr(SamplingOptions, f) for f in SamplingOptions.FIELDS}
        return dict(base, uncond=self.uncond, **SamplingOptions.model_defaults(self.config))

    def _run(self, task: str, *args, **kw):
        self.check_task(task)
        opts, rest = SamplingOptions.split(kw, **self.sampling_defaults)
        if task in ('image_to_text', 'text_variation') or rest.get('output') == 'text':
            rest['method'] = rest.pop('decode', 'sample')
        return TASKS[task].module.run(self.components, *args, options=opts, **rest)

    image_size = property(lambda self: self.components.image_size,
                          doc='Default output side (config `image_size`).')

    # -- tasks (arguments: the `run` of each module in `vd_jax.tasks`) ------------------------------
    def text_to_image(self, prompts, n: int = 1, **kw) -> np.ndarray:
        """Prompts -> images (P * n, H, W, 3) in [0, 1]; see `vd_jax.tasks.text_to_image`."""
        return self._run('text_to_image', prompts, n, **kw)

    def image_variation(self, images, n: int = 1, **kw) -> np.ndarray:
        """Images -> variations; fidelity, focus, color_adjust (`tasks.image_variation`)."""
        return self._run('image_variation', images, n, **kw)

    def image_to_text(self, images, n: int = 1, **kw) -> List[str]:
        """Images -> captions; decode='sample' | 'greedy' | 'beam' (`tasks.image_to_text`)."""
        return self._run('image_to_text', images, n, **kw)

    def text_variation(self, prompts, n: int = 1, **kw) -> List[str]:
        """Prompts -> sentences (`tasks.text_variation`)."""
        return self._run('text_variation', prompts, n, **kw)

    def dual_guided(self, prompt, image, n: int = 1, **kw):
        """One prompt + one image -> images (or sentences with output='text'); mix, level
        ('attention' | 'layer' | 'model'), focus (`tasks.dual_guided`)."""
        task = 'dual_guided_text' if kw.get('output') == 'text' else 'dual_guided'
        return self._run(task, prompt, image, n, **kw)

    def multi_context(self, images: Sequence, strengths: Optional[Sequence[float]] = None,
                      prompt: Optional[str] = None, n: int = 1, **kw) -> np.ndarray:
        """Several images (strengths, keep-masks) + an optional prompt (`tasks.multi_context`)."""
        return self._run('multi_context', images, strengths, prompt, n, **kw)

    def disentangle(self, image, n: int = 1, **kw) -> np.ndarray:
        """Style/semantic disentanglement: focus 0..1 or level -2..2 (`tasks.disentangle`)."""
        return self._run('disentangle', image, n, **kw)

    def i2t2i(self, image, positive: str = '', negative: str = '', n: int = 1,
              **kw) -> Tuple[List[str], np.ndarray]:
        """Editable image -> text -> image: (sentences, images) (`tasks.i2t2i`)."""
        return self._run('i2t2i', image, positive, negative, n, **kw)
