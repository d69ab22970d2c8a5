"""What every task shares: sampling options, argument checks, seeds and the denoising run.

The contexts a task conditions on (prompts, images, ready contexts, negatives) are built in
`vd_jax.tasks.contexts`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.batching import pad_rows, round_up
from vd_jax.diffusion import conditioning, samplers
from vd_jax.diffusion.sampling import SAMPLERS, Sampler, check_prediction
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.errors import CheckpointError, InputError
from vd_jax.image_io import as_list
from vd_jax.modalities import CONVENTIONS


@contextlib.contextmanager
def task_errors():
    """Re-raise a ValueError of the block (e.g. a `ConfigError` of the schedule) as an
    `InputError` with its message: the error of a task's arguments. An `InputError` (e.g. a
    file that is not an image) and a `CheckpointError` (a tokenizer's vocabulary file) pass
    unchanged."""
    try:
        yield
    except (InputError, CheckpointError):
        raise
    except ValueError as e:
        raise InputError(str(e)) from None


# What a model's config may recommend (`SamplingOptions.model_defaults`): the guidance scale
# depends on the trained weights (VD-mini v3 reads its captions back best at 3, VD at 7.5); the
# other options are the caller's choice of speed and sampler
MODEL_DEFAULT_FIELDS = ('scale',)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample, for every task.

    sampler: one of `vd_jax.diffusion.sampling.SAMPLERS` ('ddim', 'ddpm', 'dpm++', 'euler',
    'euler_a'); steps: grid steps; scale: classifier-free guidance (1 = conditional only);
    eta: DDIM noise; seed: sample i of a call uses seed + i; spacing: the step grid (None =
    the sampler's default, see `vd_jax.diffusion.sampling`); dtype: compute dtype of the
    diffuser ('float32' | 'bfloat16'; None = the model's); uncond: the unconditional-context
    convention (`vd_jax.modalities.CONVENTIONS`); karras: the Karras sigma grid (samplers
    that support it: dpm++); guidance_rescale: phi in [0, 1] of guidance rescale (Lin et al.
    2023; 0 = off, VD's default).
    What the model predicts (eps, v, x0) and its schedule come from the checkpoint's config
    (`model.schedule`), never from these options.
    """
    sampler: str = 'ddim'
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    seed: int = 0
    spacing: Optional[str] = None
    dtype: Optional[str] = None
    uncond: str = 'v1.0'
    karras: bool = False
    guidance_rescale: float = 0.0

    FIELDS = ('sampler', 'steps', 'scale', 'eta', 'seed', 'spacing', 'dtype', 'uncond', 'karras',
              'guidance_rescale')

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InputError(f'sampler must be one of {SAMPLERS}, got {self.sampler!r}')
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or self.steps < 1:
            raise InputError(f'steps must be a positive integer, got {self.steps!r}')
        if not float(self.scale) >= 0:
            raise InputError(f'scale (guidance) must be >= 0, got {self.scale}')
        if not float(self.eta) >= 0:
            raise InputError(f'eta must be >= 0, got {self.eta}')
        if not 0 <= float(self.guidance_rescale) <= 1:
            raise InputError(f'guidance_rescale must be in [0, 1] (the fraction phi of the '
                             f'rescaled guidance; 0 = off), got {self.guidance_rescale}')
        if not isinstance(self.karras, (bool, np.bool_)):
            raise InputError(f'karras must be True or False, got {self.karras!r}')
        if self.karras and not samplers.get(self.sampler).supports_karras:
            with_karras = tuple(n for n in SAMPLERS if samplers.get(n).supports_karras)
            raise InputError(f'karras (the Karras sigma grid) is for the samplers {with_karras}, '
                             f'not {self.sampler!r}')
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or not 0 <= int(self.seed) < 2 ** 32:
            raise InputError(f'seed must be an integer in [0, 2^32), got {self.seed!r}')
        if self.dtype not in (None, 'float32', 'bfloat16'):
            raise InputError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.uncond not in CONVENTIONS:
            raise InputError(f'uncond must be one of {CONVENTIONS}, got {self.uncond!r}')

    @classmethod
    def model_defaults(cls, config) -> dict:
        """The sampling settings a model's config recommends (its `sampling` section, e.g.
        VD-mini v3's {'scale': 3.0}): they replace this class's defaults for that model,
        and keywords a caller gives replace them. A config without the section (every
        converted VD checkpoint) gets VD's own defaults. Raises CheckpointError naming a key
        or value a model cannot recommend."""
        section = config.get('sampling', None) if config is not None else None
        if not section:
            return {}
        out = dict(section.items())
        unknown = sorted(set(out) - set(MODEL_DEFAULT_FIELDS))
        if unknown:
            raise CheckpointError(f"the model's config 'sampling' has {unknown}; a model can "
                                  f'recommend only {list(MODEL_DEFAULT_FIELDS)}')
        try:
            cls(**out)
        except InputError as e:
            raise CheckpointError(f"the model's config 'sampling': {e}") from None
        return out

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
        raise InputError(f'n (samples per input) must be an integer >= 1, got {n!r}')
    return int(n)


def prompts_list(prompts, n: int) -> List[str]:
    """Prompts (a string or a list) repeated n times each, prompt-major."""
    items = as_list(prompts)
    if not items or any(p is None for p in items):
        raise InputError('no prompt given')
    return [str(p) for p in items for _ in range(check_n(n))]


def per_prompt(values, prompts: int, what: str):
    """One value, or one per prompt (lists broadcast like prompts) -> a list per prompt."""
    items = as_list(values)
    if len(items) == 1:
        return items * prompts
    if len(items) != prompts:
        raise InputError(f'{len(items)} {what} for {prompts} prompts/inputs (give one, or one '
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
        raise InputError(f'height and width must be positive multiples of {f} for this model '
                         f'({comps.vae_factor} for the VAE x {f // comps.vae_factor} for the UNet '
                         f'levels), got {h}x{w}')
    return h, w


# ------------------------------------------------------------------------------------------------
# The denoising run
# ------------------------------------------------------------------------------------------------

def schedule_of(comps):
    """The checkpoint's schedule (`model.schedule`: betas and what the model predicts)."""
    return make_schedule(comps.config['schedule'])


def sampler_for(comps, cond, opts: SamplingOptions, start_step: Optional[int] = None) -> Sampler:
    """The Sampler of (conditioning, sampler, steps, spacing, karras, start, dtype) on the
    checkpoint's schedule, cached on the components (`comps.samplers`): equal settings reuse
    one compiled program. A grid the model cannot denoise (an eps model asked for x0 where the
    schedule has zero SNR) is an InputError here, before any sampling."""
    key = (cond, opts.sampler, int(opts.steps), opts.spacing, bool(opts.karras), start_step,
           opts.dtype)
    if key not in comps.samplers:
        dtype = jnp.dtype(opts.dtype) if opts.dtype else comps.dtype
        schedule = schedule_of(comps)
        with task_errors():
            sampler = Sampler(
                cond, sampler=opts.sampler, steps=int(opts.steps), spacing=opts.spacing,
                num_timesteps=schedule.num_timesteps, start_step=start_step,
                compute_dtype=None if dtype == jnp.float32 else dtype,
                karras=bool(opts.karras), schedule=schedule)
            check_prediction(schedule, sampler.plan)
        comps.samplers[key] = sampler
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
        raise InputError('sampling runs on a mesh of this process\'s devices (jax.local_devices()); '
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
            raise InputError('latents (an initial x_T) and a start from an image (fidelity / '
                             'start_step) are exclusive: give one of them')
        latents = jnp.asarray(latents, jnp.float32)
        want = tuple(shape) if shape is not None else tuple(latents.shape)
        if tuple(latents.shape) != want:
            raise InputError(f'latents must have shape {want}, got {tuple(latents.shape)}')
    shards = comps.data_shards
    padded = round_up(b, shards)
    args = dict(ctx=ctx, uctx=uctx, seeds=jnp.asarray(seeds), x0=x0, latents=latents)
    args = comps.shard_batch(pad_rows({k: v for k, v in args.items() if v is not None}, b, padded))
    kw = dict(uncond_context=args.get('uctx'), guidance_scale=float(opts.scale),
              eta=float(opts.eta), guidance_rescale=float(opts.guidance_rescale),
              seeds=args['seeds'], x0=args.get('x0'),
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


def mixed(comps, level: str, contexts: Sequence, unconds: Sequence, ctypes: Sequence[str],
          ratios, xtype: str, opts: SamplingOptions, *, shape, latents=None, progress=None,
          callback=None, seed_offset: int = 0):
    """Sample with several contexts mixed at `level` (attention / layer / model)."""
    with task_errors():
        cond = conditioning.mixing(level, conditioning_dtype(comps, opts), xtype, ctypes)
        b = shape[0]
        seeds = seeds_for(opts.seed + seed_offset, b)
        plan = sampler_for(comps, cond, opts).plan
        kw = dict(ratios=ratios, seeds=seeds, plan=plan)
        ctx, uctx = cond.pack(contexts, b, **kw), cond.pack(unconds, b, **kw)
    return denoise(comps, cond, ctx, uctx, opts, shape=shape, seeds=seeds, latents=latents,
                   progress=progress, callback=callback)


def single(comps, xtype: str, ctype: str, ctx, uctx, opts: SamplingOptions, **kw):
    """Sample one flow (ctype -> xtype)."""
    return denoise(comps, conditioning.Single(conditioning_dtype(comps, opts), xtype, ctype), ctx, uctx,
                   opts, **kw)
