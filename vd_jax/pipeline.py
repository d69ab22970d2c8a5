"""Versatile Diffusion end to end: every flow and application as jitted batch samplers.

    from vd_jax.pipeline import VersatileDiffusion
    vd = VersatileDiffusion.from_checkpoint('converted/vd4')        # or .random('tiny')
    images = vd.text_to_image(['a red bicycle'], n=4, seed=0)        # (4, 512, 512, 3) in [0, 1]
    texts = vd.image_to_text('cat.jpg', n=4)                         # list of 4 strings

Every task runs its whole denoising loop as one compiled program per (flow, shapes, steps,
sampler); calling it again with new prompts, images or seeds of the same shapes reuses the
program. Sample i of a call is seeded with `seed + i` and does not depend on the batch it
is in. Images are float32 arrays (B, H, W, 3) in [0, 1], channels-last.

Unconditional (negative) contexts follow the v1.0 demo by default (`uncond='v1.0'`, spec
§4): the empty prompt for text, a zero context for image contexts of image outputs, and
the CLIP context of an all-black image for image->text. `uncond='legacy'` (Nov-2022 CLI)
and `'diffusers'` use the CLIP context of a mid-gray image for every image context.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import applications as apps
from vd_jax.checkpoint import CheckpointError, available_parts, load_part, read_config
from vd_jax.diffusion.sampling import Sampler
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.image_io import as_list
from vd_jax.models.unet import Diffuser, DiffuserConfig, plan_stream

UNCOND_CONVENTIONS = ('v1.0', 'legacy', 'diffusers')
LEVELS = ('attention', 'layer', 'model')
SAMPLERS = ('ddim', 'ddpm', 'dpm++')

# What each task needs from a checkpoint (parts) and from the diffuser (flows).
TASK_PARTS = {
    'text_to_image': ('diffuser', 'ctx_text', 'vae_image'),
    'image_variation': ('diffuser', 'ctx_image', 'vae_image'),
    'image_to_text': ('diffuser', 'ctx_image', 'vae_text'),
    'text_variation': ('diffuser', 'ctx_text', 'vae_text'),
    'dual_guided': ('diffuser', 'ctx_text', 'ctx_image', 'vae_image'),
    'dual_guided_text': ('diffuser', 'ctx_text', 'ctx_image', 'vae_text'),
    'multi_context': ('diffuser', 'ctx_text', 'ctx_image', 'vae_image'),
    'disentangle': ('diffuser', 'ctx_image', 'vae_image'),
    'i2t2i': ('diffuser', 'ctx_text', 'ctx_image', 'vae_image', 'vae_text'),
}
TASK_FLOWS = {
    'text_to_image': [('image', 'text')], 'image_variation': [('image', 'image')],
    'image_to_text': [('text', 'image')], 'text_variation': [('text', 'text')],
    'dual_guided': [('image', 'text'), ('image', 'image')],
    'dual_guided_text': [('text', 'text'), ('text', 'image')],
    'multi_context': [('image', 'image')], 'disentangle': [('image', 'image')],
    'i2t2i': [('text', 'image'), ('image', 'text'), ('image', 'image')],
}

ImageLike = Union[str, np.ndarray, Any]


class TaskError(ValueError):
    """A task cannot run with this model/checkpoint or these arguments."""


def _resize01(image: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """uint8/float image -> float32 [0, 1] (h, w, 3), bicubic like PIL (the demo's resize)."""
    from vd_jax.image_io import _to_uint8_rgb, resize_bicubic
    a = _to_uint8_rgb(image, 0)
    if a.shape[:2] != tuple(hw):
        a = resize_bicubic(a, tuple(hw))
    return a.astype(np.float32) / 255.0


def _resize_mask(mask, hw) -> np.ndarray:
    """A mask (file, or (H, W) / (H, W, C) array in [0, 1] or uint8) -> (h, w) float [0, 1],
    resized bilinearly (the demo resizes masks with PIL's BILINEAR)."""
    from PIL import Image
    m = _load(mask) if isinstance(mask, str) else np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise TaskError(f'a mask must be (H, W) or an image file, got shape {m.shape}')
    m = m.astype(np.float32) / (255.0 if m.dtype == np.uint8 or m.max() > 1 else 1.0)
    if m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m, mode='F').resize((hw[1], hw[0]), Image.BILINEAR))
    return np.clip(m, 0, 1)


def _load(image: ImageLike) -> np.ndarray:
    from vd_jax.image_io import load_image
    if isinstance(image, str):
        return load_image(image)
    if hasattr(image, 'convert') and hasattr(image, 'size'):  # PIL
        return np.asarray(image.convert('RGB'))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise TaskError(f'an image must be (H, W, 3) or a file path, got an array of shape {a.shape}')
    return a


@dataclasses.dataclass
class _Models:
    diffuser: Diffuser
    vae: Any = None
    clip_text: Any = None
    clip_image: Any = None
    optimus: Any = None


class VersatileDiffusion:
    """Versatile Diffusion with its VAEs and context encoders, ready to sample.

    Args:
      model_config: the `model` section of a config (or the whole config).
      params: {part: params} for the parts available ('diffuser', 'vae_image', 'vae_text',
        'ctx_image', 'ctx_text'); tasks that need a missing part raise a clear error.
      dtype: compute dtype of the networks ('float32' or 'bfloat16'); the sampler state,
        the schedule and all outputs stay float32.
      uncond: unconditional-context convention, one of `UNCOND_CONVENTIONS`.
      source: where the weights came from (recorded by `sample.py`).
    """

    def __init__(self, model_config, params: Mapping[str, Any], *, dtype='float32',
                 uncond: str = 'v1.0', source: str = '<memory>'):
        if 'model' in model_config:
            model_config = model_config['model']
        if uncond not in UNCOND_CONVENTIONS:
            raise TaskError(f'uncond must be one of {UNCOND_CONVENTIONS}, got {uncond!r}')
        self.config = model_config
        self.params = dict(params)
        self.dtype = jnp.dtype(dtype)
        self.uncond = uncond
        self.source = source
        self.dconfig = DiffuserConfig.from_dict(model_config['diffuser'])
        self.schedule = make_schedule(model_config['schedule'])
        self.models = _Models(Diffuser(self.dconfig, dtype=self.dtype))
        self._cache: Dict[Any, Any] = {}
        self._tokenizers: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, *, dtype='float32', parts: Optional[Sequence[str]] = None,
                        uncond: str = 'v1.0') -> 'VersatileDiffusion':
        """Load a vd_jax checkpoint folder (made by `python -m vd_jax.convert` or training)."""
        cfg = read_config(path)
        have = available_parts(path)
        want = have if parts is None else tuple(parts)
        missing = [p for p in want if p not in have]
        if missing:
            raise CheckpointError(f"checkpoint '{path}' has no {missing} (it has {list(have)})")
        params = {p: load_part(path, p) for p in want}
        return cls(cfg, params, dtype=dtype, uncond=uncond, source=path)

    @classmethod
    def random(cls, config='tiny', seed: int = 0, *, dtype='float32',
               uncond: str = 'v1.0') -> 'VersatileDiffusion':
        """Every part with random (untrained) weights: a smoke test of the whole install."""
        from vd_jax.config import load_config
        from vd_jax.models.init import random_params
        cfg = load_config(config) if isinstance(config, str) else config
        cfg = cfg['model'] if 'model' in cfg else cfg
        vd = cls(cfg, {}, dtype=dtype, uncond=uncond, source=f'random:{config}:{seed}')
        abstract = vd.abstract_params()
        vd.params = {part: random_params(tree, seed + i) for i, (part, tree) in
                     enumerate(sorted(abstract.items()))}
        return vd

    def abstract_params(self) -> Dict[str, Any]:
        """Shapes of every part the config defines, without allocating."""
        from vd_jax.models.init import abstract_params
        from vd_jax.models.unet import abstract_params as diffuser_abstract
        out = {'diffuser': diffuser_abstract(self.models.diffuser)}
        cfg = self.config
        if 'image' in cfg.get('vae', {}):
            from vd_jax.models.vae import abstract_params as vae_abstract
            out['vae_image'] = vae_abstract(self._vae())
        for kind in ('text', 'image'):
            if kind in cfg.get('ctx', {}):
                from vd_jax.models import clip
                out[f'ctx_{kind}'] = clip.abstract_params(self._clip(kind))
        if 'text' in cfg.get('vae', {}):
            out['vae_text'] = self._optimus_abstract()
        return out

    # ------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------
    def check_task(self, task: str) -> None:
        """Raise `TaskError` naming what this model lacks for `task`."""
        if task not in TASK_PARTS:
            raise TaskError(f"unknown task '{task}'; tasks: {sorted(TASK_PARTS)}")
        missing = [p for p in TASK_PARTS[task] if p not in self.params]
        if missing:
            raise TaskError(f"task '{task}' needs the parts {list(TASK_PARTS[task])}; this model "
                            f"({self.source}) lacks {missing} (it has {sorted(self.params)}). "
                            'Convert them (python -m vd_jax.convert) or use a task these parts support.')
        data, ctx = self.dconfig.with_part('data'), self.dconfig.with_part('context')
        for xt, ct in TASK_FLOWS[task]:
            if xt not in data or ct not in ctx:
                raise TaskError(f"task '{task}' needs the {ct}->{xt} flow, which the diffuser "
                                f"'{self.config.get('name', '?')}' does not have (data layers: "
                                f'{list(data)}, context layers: {list(ctx)})')

    # ------------------------------------------------------------------------------------
    # Networks (built lazily) and jitted encoders
    # ------------------------------------------------------------------------------------
    def _vae(self):
        if self.models.vae is None:
            from vd_jax.models.vae import AutoencoderKL
            self.models.vae = AutoencoderKL.from_model_config(self.config, dtype=self.dtype)
        return self.models.vae

    def _clip(self, kind: str):
        from vd_jax.models import clip
        attr = f'clip_{kind}'
        if getattr(self.models, attr) is None:
            build = clip.text_context if kind == 'text' else clip.image_context
            setattr(self.models, attr, build(self.config['ctx'][kind], dtype=self.dtype))
        return getattr(self.models, attr)

    def _optimus(self):
        if self.models.optimus is None:
            from vd_jax.models import optimus
            self.models.optimus = optimus.OptimusVAE.from_model_config(self.config, dtype=self.dtype)
        return self.models.optimus

    def _optimus_abstract(self):
        from vd_jax.models import optimus
        return optimus.abstract_params(self._optimus())

    def _jit(self, name: str, fn: Callable):
        if name not in self._cache:
            self._cache[name] = jax.jit(fn)
        return self._cache[name]

    @property
    def image_size(self) -> int:
        """Default output side: the VAE's training resolution x2 for the official model
        (512), the tiny model's 32."""
        res = self.config.get('vae', {}).get('image', {}).get('resolution', 256)
        return 512 if res == 256 else int(res)

    def encode_prompts(self, prompts: Sequence[str]) -> jnp.ndarray:
        """CLIP text contexts (B, 77, D) of prompts (over-long prompts truncate with a warning)."""
        if 'text' not in self._tokenizers:
            from vd_jax.tokenizers import clip_tokenizer
            self._tokenizers['text'] = clip_tokenizer()
        ids = np.asarray(self._tokenizers['text'](list(prompts)), np.int32)
        model = self._clip('text')
        fn = self._jit('ctx_text', lambda p, ids: model.apply({'params': p}, ids)[0])
        return fn(self.params['ctx_text'], jnp.asarray(ids))

    def encode_images_context(self, images01: Sequence[np.ndarray],
                              masks: Optional[Sequence] = None) -> jnp.ndarray:
        """CLIP image contexts (B, 257, D) of images given as float [0, 1] / uint8 arrays.

        masks: optional keep-masks (H, W) in [0, 1] per image (None entries: no mask), the
        multi-context demo's masked encoding (`vd_jax.image_io.clip_token_mask`)."""
        from vd_jax.image_io import clip_preprocess, clip_token_mask
        model = self._clip('image')
        cfg = self.config['ctx']['image']
        size = int(cfg['image_size'])
        pix = jnp.asarray(clip_preprocess(list(images01), size=size))
        tm = None
        if masks is not None:
            if len(masks) != len(images01):
                raise TaskError(f'{len(masks)} masks for {len(images01)} images')
            tms = [None if m is None else clip_token_mask(m, size, int(cfg['patch_size']))
                   for m in masks]
            if any(t is not None for t in tms):
                n = (size // int(cfg['patch_size'])) ** 2 + 1
                tm = jnp.asarray(np.stack([np.ones(n, np.float32) if t is None else t for t in tms]))
        if tm is None:
            fn = self._jit('ctx_image', lambda p, x: model.apply({'params': p}, x)[0])
            return fn(self.params['ctx_image'], pix)
        fn = self._jit('ctx_image_masked', lambda p, x, m: model.apply({'params': p}, x, m)[0])
        return fn(self.params['ctx_image'], pix, tm)

    def _gray_or_black(self, value: float, hw) -> jnp.ndarray:
        return self.encode_images_context([np.full(tuple(hw) + (3,), value, np.float32)])

    def uncond_text(self, b: int) -> jnp.ndarray:
        key = ('uncond_text',)
        if key not in self._cache:
            self._cache[key] = self.encode_prompts([''])
        return jnp.repeat(self._cache[key], b, axis=0)

    def uncond_image(self, c: jnp.ndarray, output: str, hw) -> jnp.ndarray:
        """The unconditional image context matching c (B, L, D) for an output modality."""
        if self.uncond == 'v1.0' and output == 'image':
            return jnp.zeros_like(c)
        value = 0.0 if (self.uncond == 'v1.0') else 0.5  # v1.0 i2t: black; others: gray
        key = ('uncond_image', value, tuple(hw))
        if key not in self._cache:
            self._cache[key] = self._gray_or_black(value, hw)
        u = self._cache[key]
        if u.shape[1] != c.shape[1]:  # multi-image contexts concatenate tokens
            u = jnp.tile(u, (1, c.shape[1] // u.shape[1], 1))
        return jnp.repeat(u, c.shape[0], axis=0)

    def vae_encode(self, images01: np.ndarray, keys=None) -> jnp.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> scaled latents; a posterior sample per key (or the
        mean when keys is None)."""
        vae = self._vae()
        if keys is None:
            fn = self._jit('vae_mean', lambda p, x: vae.apply({'params': p}, x, None,
                                                              method=vae.encode_images))
            return fn(self.params['vae_image'], jnp.asarray(images01))

        def enc(p, x, ks):  # one key per image so results do not depend on the batch
            return jax.vmap(lambda xi, k: vae.apply({'params': p}, xi[None], k,
                                                    method=vae.encode_images)[0])(x, ks)
        return self._jit('vae_sample', enc)(self.params['vae_image'], jnp.asarray(images01), keys)

    def vae_decode(self, latents) -> np.ndarray:
        vae = self._vae()
        fn = self._jit('vae_decode', lambda p, z: vae.apply({'params': p}, z,
                                                            method=vae.decode_latents))
        return np.asarray(fn(self.params['vae_image'], latents))

    def text_encode(self, sentences: Sequence[str]) -> jnp.ndarray:
        """Optimus latents (B, latent) of sentences (lower-cased first, as the original)."""
        from vd_jax.models import optimus
        return optimus.encode_text(self._optimus(), self.params['vae_text'], list(sentences))

    def text_decode(self, z, *, method: str = 'sample', seed: int = 0, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, beam_size: int = 4,
                    remove_duplicates: bool = True) -> List[str]:
        """Optimus latents -> sentences. The original samples (temperature 1); greedy and
        beam search are available. Each sample's randomness comes from `seed + i`; the demo's
        repeated-n-gram cleanup runs when `remove_duplicates`."""
        from vd_jax.models import optimus
        return optimus.decode_latent(self._optimus(), self.params['vae_text'], z, method=method,
                                     seeds=seed + np.arange(z.shape[0]), temperature=temperature,
                                     top_k=top_k, top_p=top_p, beam_size=beam_size,
                                     remove_duplicates=remove_duplicates)

    # ------------------------------------------------------------------------------------
    # Samplers: one compiled program per (flow kind, sampler, steps, start, dtype)
    # ------------------------------------------------------------------------------------
    def _apply_fn(self, kind: Tuple):
        """A stable apply_fn(params, x, t, ctx) per flow kind (a static jit argument)."""
        key = ('apply',) + kind
        if key in self._cache:
            return self._cache[key]
        d = self.models.diffuser
        if kind[0] == 'flow':
            _, xt, ct = kind

            def fn(p, x, t, c):
                return d.apply({'params': p}, x, t, c, xt, ct)
        elif kind[0] == 'attention':
            _, xt, cts = kind

            def fn(p, x, t, c):
                return d.apply({'params': p}, x, t, list(c['c']), cts, c['r'], xt, 'attention',
                               method='mix')
        elif kind[0] == 'layer':
            _, xt, cts = kind
            n_ctx = len(plan_stream(self.dconfig.stream(xt)).context)

            def fn(p, x, t, c):
                # layer-level mixing draws one context per context layer at every model call
                # (as `apply_model_multicontext` does per step), from the sample's key and
                # the step's t; the uncond and cond halves of a sample share the draw
                def draw(k, tt, r):
                    return jax.random.choice(jax.random.fold_in(k, tt), len(cts), (n_ctx,), p=r)
                choice = jax.vmap(draw)(c['key'], t, c['r'])
                return d.apply({'params': p}, x, t, list(c['c']), cts, c['r'], xt, 'layer',
                               layer_choices=choice, method='mix')
        elif kind[0] == 'model':
            _, xt, cts = kind

            def fn(p, x, t, c):
                # model-level mixing: each step runs one whole single-context flow, chosen
                # by the step's timestep in a per-sample table (all rows equal)
                use_first = c['first'][0, t[0]]
                return jax.lax.cond(use_first,
                                    lambda: d.apply({'params': p}, x, t, c['c'][0], xt, cts[0]),
                                    lambda: d.apply({'params': p}, x, t, c['c'][1], xt, cts[1]))
        else:
            raise AssertionError(kind)
        self._cache[key] = fn
        return fn

    def _sampler(self, kind: Tuple, sampler: str, steps: int, start_step: Optional[int] = None):
        if sampler not in SAMPLERS:
            raise TaskError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise TaskError(f'steps must be a positive integer, got {steps!r}')
        key = ('sampler', kind, sampler, int(steps), start_step)
        if key not in self._cache:
            self._cache[key] = Sampler(self._apply_fn(kind), sampler=sampler, steps=int(steps),
                                       num_timesteps=self.schedule.num_timesteps,
                                       start_step=start_step,
                                       compute_dtype=None if self.dtype == jnp.float32 else self.dtype)
        return self._cache[key]

    def _run(self, kind, ctx, uctx, *, shape, seeds, sampler, steps, scale, eta, progress,
             x0=None, start_step=None):
        s = self._sampler(kind, sampler, steps, start_step)
        kw = dict(uncond_context=uctx, guidance_scale=scale, eta=eta, seeds=jnp.asarray(seeds),
                  shape=None if x0 is not None else tuple(shape), x0=x0)
        if progress:
            cb = progress if callable(progress) else None
            return s.sample_chunked(self.params['diffuser'], self.schedule, ctx,
                                    chunk=max(1, min(10, steps)), callback=cb, **kw)
        return s(self.params['diffuser'], self.schedule, ctx, **kw)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 8 for kl-f8 (2 ** (levels - 1) in general)."""
        return 2 ** (len(self.config['vae']['image']['ch_mult']) - 1)

    def _latent_shape(self, xtype: str, b: int, hw) -> Tuple[int, ...]:
        s = self.dconfig.stream(xtype)
        if s.kind == '0d':
            return (b, s.in_channels)
        f = self.vae_factor
        return (b, hw[0] // f, hw[1] // f, s.in_channels)

    def _hw(self, height, width) -> Tuple[int, int]:
        h = int(height or self.image_size)
        w = int(width or self.image_size)
        levels = len(self.dconfig.stream('image').channel_mult) if 'image' in self.dconfig.names else 1
        f = self.vae_factor * 2 ** (levels - 1)
        if h % f or w % f or h <= 0 or w <= 0:
            raise TaskError(f'height and width must be positive multiples of {f} for this model '
                            f'({self.vae_factor} for the VAE x {f // self.vae_factor} for the UNet '
                            f'levels), got {h}x{w}')
        return h, w

    @staticmethod
    def _seeds(seed: int, b: int) -> np.ndarray:
        return (int(seed) + np.arange(b)).astype(np.uint32)

    # ------------------------------------------------------------------------------------
    # Image inputs
    # ------------------------------------------------------------------------------------
    def _images(self, images, hw) -> np.ndarray:
        """Load and resize (bicubic, as the demo) to the output size: (B, h, w, 3) in [0, 1]."""
        items = as_list(images)
        if not items:
            raise TaskError('no input image given')
        return np.stack([_resize01(_load(im), hw) for im in items])

    def _image_context(self, images01: np.ndarray, focus=None,
                       legacy_level: Optional[int] = None, masks=None) -> jnp.ndarray:
        """CLIP contexts of images; `focus` (one value, or one per image) applies the v1.0
        disentanglement to the 256 patch tokens (the global CLS token is kept)."""
        c = self.encode_images_context(list(images01), masks)
        focus = list(focus) if isinstance(focus, (list, tuple, np.ndarray)) else [focus] * len(c)
        if len(focus) != len(c):
            raise TaskError(f'{len(focus)} focus values for {len(c)} images')
        if any(f is not None and float(f) != 0.5 for f in focus):
            rows = [c[i:i + 1] if f is None or float(f) == 0.5 else jnp.concatenate(
                [c[i:i + 1, :1], apps.adjust_rank(c[i:i + 1, 1:], f)], axis=1)
                for i, f in enumerate(focus)]
            c = jnp.concatenate(rows, axis=0)
        if legacy_level:
            c = apps.legacy_disentangle(c, legacy_level)
        return c

    # ------------------------------------------------------------------------------------
    # The four flows
    # ------------------------------------------------------------------------------------
    def text_to_image(self, prompts, n: int = 1, *, steps: int = 50, scale: float = 7.5,
                      sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None,
                      width=None, negative_prompt: str = '', progress=False) -> np.ndarray:
        """Prompts -> images (len(prompts) * n, H, W, 3) in [0, 1] (prompt-major order)."""
        self.check_task('text_to_image')
        prompts = [str(p) for p in as_list(prompts) for _ in range(n)]
        hw = self._hw(height, width)
        b = len(prompts)
        c = self.encode_prompts(prompts)
        u = self.encode_prompts([negative_prompt] * b) if negative_prompt else self.uncond_text(b)
        z = self._run(('flow', 'image', 'text'), c, u, shape=self._latent_shape('image', b, hw),
                      seeds=self._seeds(seed, b), sampler=sampler, steps=steps, scale=scale,
                      eta=eta, progress=progress)
        return self.vae_decode(z)

    def image_variation(self, images, n: int = 1, *, steps: int = 50, scale: float = 7.5,
                        sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None,
                        width=None, fidelity: float = 0.0, focus: float = 0.5,
                        color_adjust: bool = False, progress=False) -> np.ndarray:
        """Images -> variations (len(images) * n, H, W, 3).

        fidelity in [0, 1): start from the VAE latent of the input noised to step
          int(steps * (1 - fidelity)) (the demo's slider, with its off-by-one start); 1
          returns the inputs.
        focus: the v1.0 style/semantic slider (0 semantic, 0.5 off, 1 style).
        color_adjust: match each output's colour statistics to its input ('Simple').
        """
        self.check_task('image_variation')
        if not 0.0 <= float(fidelity) <= 1.0:
            raise TaskError(f'fidelity must be in [0, 1], got {fidelity}')
        hw = self._hw(height, width)
        inputs = self._images(images, hw)
        x_in = np.repeat(inputs, n, axis=0)
        b = x_in.shape[0]
        if float(fidelity) == 1.0:
            return x_in.copy()
        c = jnp.repeat(self._image_context(inputs, focus), n, axis=0)
        u = self.uncond_image(c, 'image', hw)
        seeds = self._seeds(seed, b)
        x0 = start = None
        if float(fidelity) > 0:
            start = int(steps * (1 - float(fidelity)))
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 2))(jnp.asarray(seeds))
            x0 = self.vae_encode(x_in, keys)
        z = self._run(('flow', 'image', 'image'), c, u, shape=self._latent_shape('image', b, hw),
                      seeds=seeds, sampler=sampler, steps=steps, scale=scale, eta=eta,
                      progress=progress, x0=x0, start_step=start)
        out = self.vae_decode(z)
        if color_adjust:
            out = np.stack([apps.color_adjust(o[None], r)[0] for o, r in zip(out, x_in)])
        return out

    def image_to_text(self, images, n: int = 1, *, steps: int = 50, scale: float = 7.5,
                      sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, decode: str = 'sample',
                      temperature: float = 1.0, progress=False, **decode_kw) -> List[str]:
        """Images -> captions (len(images) * n strings). The image goes to CLIP at the demo's
        512x512 (its aspect ratio is not kept, as in the demo)."""
        self.check_task('image_to_text')
        hw = (512, 512)
        inputs = self._images(images, hw)
        c = jnp.repeat(self._image_context(inputs), n, axis=0)
        b = c.shape[0]
        u = self.uncond_image(c, 'text', hw)
        z = self._run(('flow', 'text', 'image'), c, u, shape=self._latent_shape('text', b, None),
                      seeds=self._seeds(seed, b), sampler=sampler, steps=steps, scale=scale,
                      eta=eta, progress=progress)
        return self.text_decode(z, method=decode, seed=seed, temperature=temperature, **decode_kw)

    def text_variation(self, prompts, n: int = 1, *, steps: int = 50, scale: float = 7.5,
                       sampler: str = 'ddim', eta: float = 0.0, seed: int = 0,
                       decode: str = 'sample', temperature: float = 1.0, progress=False,
                       **decode_kw) -> List[str]:
        """Prompts -> sentences (len(prompts) * n)."""
        self.check_task('text_variation')
        prompts = [str(p) for p in as_list(prompts) for _ in range(n)]
        b = len(prompts)
        c = self.encode_prompts(prompts)
        z = self._run(('flow', 'text', 'text'), c, self.uncond_text(b),
                      shape=self._latent_shape('text', b, None), seeds=self._seeds(seed, b),
                      sampler=sampler, steps=steps, scale=scale, eta=eta, progress=progress)
        return self.text_decode(z, method=decode, seed=seed, temperature=temperature, **decode_kw)

    # ------------------------------------------------------------------------------------
    # Applications
    # ------------------------------------------------------------------------------------
    def _mixed(self, level: str, cs: Tuple, us: Tuple, ctypes: Tuple[str, ...], ratios,
               xtype: str, b: int, *, shape, seed, sampler, steps, scale, eta, progress):
        """Sample with several contexts mixed at `level` (attention / layer / model)."""
        if level not in LEVELS:
            raise TaskError(f'level must be one of {LEVELS}, got {level!r}')
        r = np.asarray(ratios, np.float32)
        if np.any(r < 0) or r.sum() <= 0:
            raise TaskError(f'mix ratios must be >= 0 and not all 0, got {list(r)}')
        r = r / r.sum()
        seeds = self._seeds(seed, b)
        if level == 'attention':
            ctx = {'c': cs, 'r': jnp.tile(jnp.asarray(r), (b, 1))}
            uctx = {'c': us, 'r': ctx['r']}
        elif level == 'layer':
            # per-sample keys (the original draws from numpy's global RNG, once per layer and
            # step for the whole batch; per-sample keys keep samples independent of the batch)
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 3))(
                jnp.asarray(seeds))  # raw uint32 (B, 2): batch-leading, so CFG can concatenate
            rb = jnp.tile(jnp.asarray(r), (b, 1))
            ctx, uctx = {'c': cs, 'key': keys, 'r': rb}, {'c': us, 'key': keys, 'r': rb}
        else:
            if len(cs) != 2:
                raise TaskError('model-level mixing takes exactly two contexts')
            # the paper's ensemble baseline: alternate whole single-context flows over the
            # steps; context 0 runs on a fraction r[0] of the steps, spread evenly
            from vd_jax.diffusion.sampling import make_plan
            plan = make_plan(sampler, steps, num_timesteps=self.schedule.num_timesteps)
            table = np.zeros(self.schedule.num_timesteps + 1, bool)
            for p, t in enumerate(plan.timesteps):
                table[t] = math.floor((p + 1) * r[0]) > math.floor(p * r[0])
            first = jnp.tile(jnp.asarray(table), (b, 1))
            ctx, uctx = {'c': cs, 'first': first}, {'c': us, 'first': first}
        return self._run((level, xtype, tuple(ctypes)), ctx, uctx, shape=shape, seeds=seeds,
                         sampler=sampler, steps=steps, scale=scale, eta=eta, progress=progress)

    def dual_guided(self, prompt: str, image, n: int = 1, *, mix: float = 0.5,
                    level: str = 'attention', steps: int = 50, scale: float = 7.5,
                    sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None,
                    width=None, focus: float = 0.5, output: str = 'image',
                    progress=False) -> np.ndarray:
        """One prompt + one image -> n images (or sentences with output='text').

        mix: the text strength in [0, 1] (1 = text only, 0 = image only).
        level: 'attention' (every context layer mixes both: h = mix * text(h) + (1-mix) *
          image(h)), 'layer' (each context layer runs one context, drawn with probability
          mix per layer), or 'model' (the paper's baseline: whole single-context steps
          alternate, text on a fraction `mix` of the steps).
        """
        if not 0.0 <= float(mix) <= 1.0:
            raise TaskError(f'mix (text strength) must be in [0, 1], got {mix}')
        if output not in ('image', 'text'):
            raise TaskError(f"output must be 'image' or 'text', got {output!r}")
        self.check_task('dual_guided' if output == 'image' else 'dual_guided_text')
        hw = self._hw(height, width) if output == 'image' else (512, 512)
        img = self._images(image, hw)[:1]
        ct = self.encode_prompts([str(prompt)] * n)
        ci = jnp.repeat(self._image_context(img, focus), n, axis=0)
        cs = (ct, ci)
        us = (self.uncond_text(n), self.uncond_image(ci, output, hw))
        z = self._mixed(level, cs, us, ('text', 'image'), [mix, 1 - float(mix)], output, n,
                        shape=self._latent_shape(output, n, hw), seed=seed, sampler=sampler,
                        steps=steps, scale=scale, eta=eta, progress=progress)
        return self.vae_decode(z) if output == 'image' else self.text_decode(z, seed=seed)

    def multi_context(self, images: Sequence, strengths: Optional[Sequence[float]] = None,
                      prompt: Optional[str] = None, n: int = 1, *, text_strength: float = 0.5,
                      masks: Optional[Sequence] = None, steps: int = 50, scale: float = 7.5,
                      sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None,
                      width=None, focus=0.5, progress=False) -> np.ndarray:
        """Several images (each scaled by its strength, tokens concatenated into one image
        context) plus an optional prompt, mixed at attention level (the demo's MCG).

        masks: optional keep-mask per image ((H, W) in [0, 1], 1 = use this region; None =
          whole image); resized with the image, then applied to CLIP's tokens as the demo.
        focus: one style/semantic focus for all images or one per image.
        """
        self.check_task('multi_context')
        hw = self._hw(height, width)
        imgs = self._images(images, hw)
        strengths = [1.0] * len(imgs) if strengths is None else [float(s) for s in strengths]
        if len(strengths) != len(imgs):
            raise TaskError(f'{len(strengths)} strengths for {len(imgs)} images')
        if masks is not None:
            masks = [None if m is None else _resize_mask(m, hw) for m in as_list(masks)]
        c_each = self._image_context(imgs, focus, masks=masks)
        ci = jnp.concatenate([c_each[i:i + 1] * s for i, s in enumerate(strengths)], axis=1)
        ci = jnp.repeat(ci, n, axis=0)
        ui = self.uncond_image(ci, 'image', hw)
        shape = self._latent_shape('image', n, hw)
        if not prompt or float(text_strength) == 0:
            return self.vae_decode(self._run(('flow', 'image', 'image'), ci, ui, shape=shape,
                                             seeds=self._seeds(seed, n), sampler=sampler,
                                             steps=steps, scale=scale, eta=eta, progress=progress))
        if not 0.0 <= float(text_strength) <= 1.0:
            raise TaskError(f'text_strength must be in [0, 1], got {text_strength}')
        ct = self.encode_prompts([str(prompt)] * n)
        z = self._mixed('attention', (ct, ci), (self.uncond_text(n), ui), ('text', 'image'),
                        [text_strength, 1 - float(text_strength)], 'image', n, shape=shape,
                        seed=seed, sampler=sampler, steps=steps, scale=scale, eta=eta,
                        progress=progress)
        return self.vae_decode(z)

    def disentangle(self, image, n: int = 1, *, focus: Optional[float] = None,
                    level: Optional[int] = None, steps: int = 50, scale: float = 7.5,
                    sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None,
                    width=None, progress=False) -> np.ndarray:
        """Style/semantic disentanglement of an image variation (spec §6.1).

        focus: the v1.0 demo's continuous control in [0, 1] (0 = semantic, 0.5 = plain
          variation, 1 = style), applied to the conditional context only.
        level: the paper/CLI levels -2..2 (negative = semantic, positive = style), applied
          to the conditional and the unconditional context as the CLI does.
        Give exactly one of them.
        """
        if (focus is None) == (level is None):
            raise TaskError('disentangle: give exactly one of focus (0..1) or level (-2..2)')
        if focus is not None:
            return self.image_variation(image, n, steps=steps, scale=scale, sampler=sampler,
                                        eta=eta, seed=seed, height=height, width=width,
                                        focus=focus, progress=progress)
        if level not in (-2, -1, 0, 1, 2):
            raise TaskError(f'disentangle level must be one of -2, -1, 0, 1, 2; got {level!r}')
        self.check_task('disentangle')
        hw = self._hw(height, width)
        img = self._images(image, hw)[:1]
        c = self._image_context(img)
        u = self.uncond_image(c, 'image', hw)
        c, u = apps.legacy_disentangle(c, level), apps.legacy_disentangle(u, level)
        c, u = jnp.repeat(c, n, axis=0), jnp.repeat(u, n, axis=0)
        z = self._run(('flow', 'image', 'image'), c, u, shape=self._latent_shape('image', n, hw),
                      seeds=self._seeds(seed, n), sampler=sampler, steps=steps, scale=scale,
                      eta=eta, progress=progress)
        return self.vae_decode(z)

    def i2t2i(self, image, positive: str = '', negative: str = '', n: int = 1, *,
              image_weight: float = 0.33, steps: int = 50, scale: float = 7.5,
              sampler: str = 'ddim', eta: float = 0.0, seed: int = 0, height=None, width=None,
              progress=False) -> Tuple[List[str], np.ndarray]:
        """Editable image -> text -> image (legacy CLI, spec §6.2): caption latents of the image
        are edited (the negative prompt's direction removed, the positive prompt's latent
        added), decoded to sentences, and an image is generated from those sentences plus the
        positive prompt (text tokens concatenated) mixed with the image's low-rank (style)
        context at weight `image_weight`. Returns (edited sentences, images)."""
        self.check_task('i2t2i')
        hw = self._hw(height, width)
        cim = jnp.repeat(self.encode_images_context(list(self._images(image, (512, 512))[:1])), n, 0)
        uim = self.uncond_image(cim, 'text', (512, 512))
        b = n
        zt = self._run(('flow', 'text', 'image'), cim, uim, shape=self._latent_shape('text', b, None),
                       seeds=self._seeds(seed, b), sampler=sampler, steps=steps, scale=scale,
                       eta=eta, progress=progress)
        z_neg = self.text_encode([negative])[0]
        z_pos = self.text_encode([positive])[0]
        zt = apps.edit_text_latent(zt, z_neg, z_pos)
        texts = self.text_decode(zt, seed=seed)
        ctx_text = jnp.concatenate([self.encode_prompts(texts),
                                    jnp.repeat(self.encode_prompts([positive]), b, 0)], axis=1)
        u_text = jnp.concatenate([self.uncond_text(b)] * 2, axis=1)
        c_img = apps.find_low_rank(cim[:, 1:], q=10)
        u_img = self.uncond_image(cim, 'image', hw)[:, 1:]
        z = self._mixed('attention', (c_img, ctx_text), (u_img, u_text), ('image', 'text'),
                        [image_weight, 1 - float(image_weight)], 'image', b,
                        shape=self._latent_shape('image', b, hw), seed=seed + 1000,
                        sampler=sampler, steps=steps, scale=scale, eta=eta, progress=progress)
        return texts, self.vae_decode(z)
