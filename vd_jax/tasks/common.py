"""What every task shares: sampling options, the denoising run, inputs and seeds."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.diffusion.sampling import SAMPLERS, Sampler
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.image_io import as_list


class TaskError(ValueError):
    """A task cannot run with this model/checkpoint or these arguments."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample, for every task.

    sampler: 'ddim' | 'ddpm' | 'dpm++'; steps: grid steps; scale: classifier-free guidance
    (1 = conditional only); eta: DDIM noise; seed: sample i of a call uses seed + i;
    spacing: the step grid (None = the sampler's default, see `vd_jax.diffusion.sampling`);
    dtype: compute dtype of the diffuser ('float32' | 'bfloat16'; None = the model's);
    uncond: the unconditional-context convention (`vd_jax.modalities.CONVENTIONS`).
    """
    sampler: str = 'ddim'
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    seed: int = 0
    spacing: Optional[str] = None
    dtype: Optional[str] = None
    uncond: str = 'v1.0'

    FIELDS = ('sampler', 'steps', 'scale', 'eta', 'seed', 'spacing', 'dtype', 'uncond')

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise TaskError(f'sampler must be one of {SAMPLERS}, got {self.sampler!r}')
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or self.steps < 1:
            raise TaskError(f'steps must be a positive integer, got {self.steps!r}')
        if not float(self.scale) >= 0:
            raise TaskError(f'scale (guidance) must be >= 0, got {self.scale}')
        if not float(self.eta) >= 0:
            raise TaskError(f'eta must be >= 0, got {self.eta}')
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= int(self.seed) < 2 ** 32:
            raise TaskError(f'seed must be an integer in [0, 2^32), got {self.seed!r}')
        if self.dtype not in (None, 'float32', 'bfloat16'):
            raise TaskError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        from vd_jax.modalities import CONVENTIONS
        if self.uncond not in CONVENTIONS:
            raise TaskError(f'uncond must be one of {CONVENTIONS}, got {self.uncond!r}')

    @classmethod
    def split(cls, kwargs: dict, **defaults) -> Tuple['SamplingOptions', dict]:
        """(options from the option keywords in `kwargs` over `defaults`, the other keywords)."""
        kwargs = dict(kwargs)
        opts = dict(defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in cls.FIELDS})
        return cls(**opts), kwargs


def seeds_for(seed: int, b: int) -> np.ndarray:
    """Per-sample seeds: sample i of a call uses seed + i, whatever the batch."""
    return (int(seed) + np.arange(b)).astype(np.uint32)


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TaskError(f'n (samples per input) must be an integer >= 1, got {n!r}')
    return int(n)


def prompts_list(prompts, n: int) -> List[str]:
    """Prompts (a string or a list) repeated n times each, prompt-major."""
    items = as_list(prompts)
    if not items or any(p is None for p in items):
        raise TaskError('no prompt given')
    return [str(p) for p in items for _ in range(check_n(n))]


def per_prompt(values, prompts: int, what: str):
    """One value, or one per prompt (lists broadcast like prompts) -> a list per prompt."""
    items = as_list(values)
    if len(items) == 1:
        return items * prompts
    if len(items) != prompts:
        raise TaskError(f'{len(items)} {what} for {prompts} prompts/inputs (give one, or one '
                        'per prompt)')
    return items


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

def image_hw(comps, height=None, width=None) -> Tuple[int, int]:
    """The output size (config `image_size` by default), checked against the model."""
    h = int(height or comps.image_size)
    w = int(width or comps.image_size)
    f = comps.size_multiple
    if h % f or w % f or h <= 0 or w <= 0:
        raise TaskError(f'height and width must be positive multiples of {f} for this model '
                        f'({comps.vae_factor} for the VAE x {f // comps.vae_factor} for the UNet '
                        f'levels), got {h}x{w}')
    return h, w


def load_images(images, hw) -> np.ndarray:
    """Files / arrays / PIL images -> (B, h, w, 3) float32 in [0, 1], resized bicubically
    (as the demo) to hw."""
    from vd_jax.image_io import ImageReadError, _to_uint8_rgb, resize_bicubic
    items = as_list(images)
    if not items:
        raise TaskError('no input image given')
    out = []
    for i, im in enumerate(items):
        try:
            a = _to_uint8_rgb(im, i)
        except ImageReadError:
            raise
        except ValueError as e:
            raise TaskError(str(e)) from None
        if a.shape[:2] != tuple(hw):
            a = resize_bicubic(a, tuple(hw))
        out.append(a.astype(np.float32) / 255.0)
    return np.stack(out)


def load_mask(mask, hw) -> np.ndarray:
    """A keep-mask (file, or (H, W) / (H, W, C) array in [0, 1] or uint8) -> (h, w) float
    in [0, 1], resized bilinearly (the demo resizes masks with PIL's BILINEAR)."""
    from PIL import Image
    from vd_jax.image_io import load_image
    m = load_image(mask) if isinstance(mask, str) else np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise TaskError(f'a mask must be (H, W) or an image file, got shape {m.shape}')
    m = m.astype(np.float32) / (255.0 if m.dtype == np.uint8 or m.max() > 1 else 1.0)
    if m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m, mode='F').resize((hw[1], hw[0]), Image.BILINEAR))
    return np.clip(m, 0, 1)


# ------------------------------------------------------------------------------------------------
# The denoising run
# ------------------------------------------------------------------------------------------------

def schedule_of(comps):
    return make_schedule(comps.config['schedule'])


def sampler_for(comps, cond, opts: SamplingOptions, start_step: Optional[int] = None) -> Sampler:
    """The Sampler of (conditioning, sampler, steps, spacing, start, dtype), cached on the
    components (`comps.samplers`): equal settings reuse one compiled program."""
    key = (cond, opts.sampler, int(opts.steps), opts.spacing, start_step, opts.dtype)
    if key not in comps.samplers:
        dtype = jnp.dtype(opts.dtype) if opts.dtype else comps.dtype
        try:
            comps.samplers[key] = Sampler(
                cond, sampler=opts.sampler, steps=int(opts.steps), spacing=opts.spacing,
                num_timesteps=int(comps.config['schedule']['timesteps']),
                start_step=start_step, compute_dtype=None if dtype == jnp.float32 else dtype)
        except ValueError as e:
            raise TaskError(str(e)) from None
    return comps.samplers[key]


def conditioning_dtype(comps, opts: SamplingOptions):
    """The diffuser to condition: the components' one, or a clone in the options' dtype."""
    d = comps.module('diffuser')
    if opts.dtype and jnp.dtype(opts.dtype) != d.dtype:
        d = d.clone(dtype=jnp.dtype(opts.dtype))
    return d if comps.adapters is None else comps.adapters.wrap(d)  # LoRA (vd_jax.lora)


def diffuser_params(comps):
    """The diffuser parameters the samplers run: the base, or with LoRA adapters loaded the
    form `conditioning_dtype`'s diffuser reads (merged, or base + adapters on the fly)."""
    base = comps.params['diffuser']
    return base if comps.adapters is None else comps.adapters.sampling_params(base)


def _pad(tree, b: int, to: int):
    if to == b:
        return tree
    return jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], to - b, axis=0)], axis=0), tree)


def denoise(comps, cond, ctx, uctx, opts: SamplingOptions, *, shape=None, seeds=None,
            x0=None, start_step: Optional[int] = None, latents=None,
            progress: Any = None, callback: Optional[Callable] = None) -> jax.Array:
    """Run a sampler for one conditioning and return the clean latents (B, ...) float32.

    Args:
      ctx / uctx: packed (conditional / unconditional) contexts, batch-leading leaves.
      shape: latent shape (B, ...) for a start from noise; seeds: (B,) per-sample seeds.
      x0: clean latents to start from at `start_step` (image-variation fidelity).
      latents: initial noisy latents x_T (B, ...) instead of noise drawn from the seeds.
      progress: True, or a callable(done, total) (e.g. a progress-bar update).
      callback: callable(step_index, latents (B, ...)) after every step.
    With a mesh, the batch is padded to a multiple of the data axes, split over them and
    trimmed again; per-sample seeds make the result equal to a single-device run.
    """
    if comps.mesh is not None and not comps.splits_batches:
        raise TaskError('sampling runs on a mesh of this process\'s devices (jax.local_devices()); '
                        'this mesh spans several processes (sample.py --distributed gives each '
                        'process its own mesh)')
    sampler = sampler_for(comps, cond, opts, start_step)
    b = next(x for x in (None if shape is None else shape[0],
                         None if x0 is None else x0.shape[0],
                         None if latents is None else latents.shape[0]) if x is not None)
    if seeds is None:
        seeds = seeds_for(opts.seed, b)
    if latents is not None:
        if x0 is not None:
            raise TaskError('latents (an initial x_T) and a start from an image (fidelity / '
                            'start_step) are exclusive: give one of them')
        latents = jnp.asarray(latents, jnp.float32)
        want = tuple(shape) if shape is not None else tuple(latents.shape)
        if tuple(latents.shape) != want:
            raise TaskError(f'latents must have shape {want}, got {tuple(latents.shape)}')
    shards = comps.data_shards
    padded = -(-b // shards) * shards
    args = dict(ctx=ctx, uctx=uctx, seeds=jnp.asarray(seeds), x0=x0, latents=latents)
    args = comps.shard_batch(_pad({k: v for k, v in args.items() if v is not None}, b, padded))
    kw = dict(uncond_context=args.get('uctx'), guidance_scale=float(opts.scale),
              eta=float(opts.eta), seeds=args['seeds'], x0=args.get('x0'),
              x_T=args.get('latents'),
              shape=None if (x0 is not None or latents is not None) else
              (padded,) + tuple(shape[1:]))
    params = diffuser_params(comps)
    schedule = schedule_of(comps)
    # the mesh and the logical-axis rules while the sampler traces: the diffuser's activation
    # constraints (batch over the data axes) resolve against them
    with comps.on_mesh():
        if progress or callback is not None:
            chunk = 1 if callback is not None else max(1, min(10, int(opts.steps)))
            state = None
            for done, total, state in sampler.iterate(params, schedule, args['ctx'],
                                                      chunk=chunk, **kw):
                if callable(progress):
                    progress(done, total)
                if callback is not None and total:
                    callback(sampler.plan.start + done - 1, state.x[:b])
            z = state.x
        else:
            z = sampler(params, schedule, args['ctx'], **kw)
    return z[:b]


def context_seeds(seed: int, b: int, salt: int):
    """Per-sample keys for a task's own draws (e.g. the VAE posterior of a fidelity start),
    independent of the sampler's keys: fold_in(PRNGKey(seed + i), salt)."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), salt))(
        jnp.asarray(seeds_for(seed, b)))


def repeat(x, n: int):
    return jnp.repeat(x, n, axis=0)


def token_ids(prompts) -> Optional[np.ndarray]:
    """Prompts given as CLIP token ids -> (P, L) int array; None for strings. Token ids are
    an integer array (P, L) or (L,), or a list of equal-length integer sequences."""
    if isinstance(prompts, str) or prompts is None:
        return None
    if isinstance(prompts, (np.ndarray, jax.Array)):
        a = np.asarray(prompts)
        if not np.issubdtype(a.dtype, np.integer):
            raise TaskError(f'prompts given as an array must be integer CLIP token ids, got '
                            f'dtype {a.dtype}')
        return a[None] if a.ndim == 1 else a
    items = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
    seqs = [x for x in items if isinstance(x, (list, tuple, np.ndarray, jax.Array))]
    if not seqs:
        return None
    if len(seqs) != len(items) or not all(
            np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) == 1 for x in seqs):
        raise TaskError('prompts must be strings or CLIP token ids (integer sequences of '
                        'equal length), not a mix')
    if len({len(x) for x in seqs}) > 1:
        raise TaskError('token-id prompts must have equal lengths, got '
                        f'{sorted({len(x) for x in seqs})}')
    return np.asarray([np.asarray(x) for x in seqs])


def ready_context(comps, context, modality: str, what: str = 'context') -> jnp.ndarray:
    """Ready contexts (P, L, D) of `modality` (e.g. from `comps.encode_context`; one (L, D)
    is P = 1), checked against the model: L the modality's context length, D the diffuser's
    context width."""
    from vd_jax import modalities as M
    c = jnp.asarray(context, jnp.float32)
    if c.ndim == 2:
        c = c[None]
    length = M.get(modality).context_length(comps.config)
    dim = int(comps.config['diffuser']['streams'][modality].get('context_dim', 768)) \
        if modality in comps.config['diffuser']['streams'] else None
    if c.ndim != 3 or c.shape[0] < 1 or c.shape[1] != length or (dim and c.shape[2] != dim):
        raise TaskError(f'{what}: ready {modality} contexts must be (P, {length}, {dim}) float '
                        f'arrays (as comps.encode_context({modality!r}, ...) gives), got shape '
                        f'{tuple(c.shape)}')
    return c


def text_contexts(comps, prompts, n: int, context=None):
    """CLIP text contexts of prompts (strings, or token ids: see `token_ids`), each repeated
    n times prompt-major; or ready contexts (P, L, D) given as `context`."""
    if context is not None:
        return repeat(ready_context(comps, context, 'text'), check_n(n))
    ids = token_ids(prompts)
    if ids is not None:
        try:
            return repeat(comps.encode_context('text', ids), check_n(n))
        except ValueError as e:
            raise TaskError(str(e)) from None
    n = check_n(n)
    # each prompt encoded once, then repeated: a truncation warning names the user's index
    return repeat(comps.encode_context('text', prompts_list(prompts, 1)), n)


def negative_text_context(comps, negative, like, prompts: int, n: int, output: str, convention: str):
    """The unconditional text context: the convention's, or negative prompts (one, or one
    per prompt; strings or token ids) each repeated n times."""
    if negative is None or (isinstance(negative, str) and negative == ''):
        return comps.uncond_context('text', output, convention, like)
    ids = token_ids(negative)
    if ids is not None:
        rows = per_prompt(list(ids), prompts, 'negative prompts')
        return repeat(comps.encode_context('text', np.stack(rows)), n)
    neg = [str(x) for x in per_prompt(negative, prompts, 'negative prompts')]
    return repeat(comps.encode_context('text', neg), n)


def negative_image_context(comps, negative, like, images: int, n: int, output: str, convention: str,
                           hw):
    """The unconditional image context: the convention's, or negative images (one, or one
    per input) each repeated n times."""
    if negative is None:
        return comps.uncond_context('image', output, convention, like)
    neg = per_prompt(negative, images, 'negative images')
    u = repeat(comps.encode_context('image', list(load_images(neg, hw))), n)
    if u.shape[1] != like.shape[1]:
        u = jnp.tile(u, (1, like.shape[1] // u.shape[1], 1))
    return u


def mixed(comps, level: str, contexts: Sequence, unconds: Sequence, ctypes: Sequence[str],
          ratios, xtype: str, opts: SamplingOptions, *, shape, latents=None, progress=None,
          callback=None, seed_offset: int = 0):
    """Sample with several contexts mixed at `level` (attention / layer / model)."""
    from vd_jax.diffusion import conditioning
    try:
        cond = conditioning.mixing(level, conditioning_dtype(comps, opts), xtype, ctypes)
        b = shape[0]
        seeds = seeds_for(opts.seed + seed_offset, b)
        plan = sampler_for(comps, cond, opts).plan
        kw = dict(ratios=ratios, seeds=seeds, plan=plan)
        ctx, uctx = cond.pack(contexts, b, **kw), cond.pack(unconds, b, **kw)
    except ValueError as e:
        raise TaskError(str(e)) from None
    return denoise(comps, cond, ctx, uctx, opts, shape=shape, seeds=seeds, latents=latents,
                   progress=progress, callback=callback)


def single(comps, xtype: str, ctype: str, ctx, uctx, opts: SamplingOptions, **kw):
    """Sample one flow (ctype -> xtype)."""
    from vd_jax.diffusion.conditioning import Single
    return denoise(comps, Single(conditioning_dtype(comps, opts), xtype, ctype), ctx, uctx,
                   opts, **kw)


def image_contexts(comps, images01: np.ndarray, focus=None, masks=None, context=None):
    """CLIP contexts (B, 257, D) of images, or the ready contexts `context` (B, 257, D);
    `focus` (one value, or one per image) applies the v1.0 style/semantic disentanglement to
    the patch tokens (the global CLS token is kept); `masks`: keep-masks per image (None
    entries: whole image)."""
    from vd_jax import applications as apps
    if context is not None:
        c = ready_context(comps, context, 'image')
    else:
        c = comps.encode_context('image', list(images01), masks=masks)
    focus = list(focus) if isinstance(focus, (list, tuple, np.ndarray)) else [focus] * len(c)
    if len(focus) != len(c):
        raise TaskError(f'{len(focus)} focus values for {len(c)} images')
    if any(f is not None and float(f) != 0.5 for f in focus):
        try:
            rows = [c[i:i + 1] if f is None or float(f) == 0.5 else jnp.concatenate(
                [c[i:i + 1, :1], apps.adjust_rank(c[i:i + 1, 1:], f)], axis=1)
                for i, f in enumerate(focus)]
        except ValueError as e:
            raise TaskError(str(e)) from None
        c = jnp.concatenate(rows, axis=0)
    return c
