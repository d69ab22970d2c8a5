"""Which source layouts exist, which keys each part of a checkpoint claims, and the
registry of part converters (diffuser here; VAEs and context encoders register theirs).

A part converter answers, for a model config and a detected layout:
  * `has_part(model_cfg)`: does the config define this part?
  * `target(model_cfg)`: Flax path -> shape of every parameter (from `jax.eval_shape`);
  * `tables(model_cfg, layout, keys)`: (rules, ignore, rename, tied) for `engine.build_plan`;
  * `export_names(model_cfg, layout, canonical_keys)`: for exports, ({canonical key: key
    in that layout}, {copy key: key it duplicates}); the names are checked by converting
    them back with `tables`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from vd_jax.checkpoint import flatten
from vd_jax.convert.engine import Ignore, Rule
from vd_jax.errors import CheckpointError

# The 12 DDPM schedule buffers every VD state dict carries (vd.py:127-185): recomputed by
# `vd_jax.diffusion.make_schedule`, so never converted.
SCHEDULE_BUFFERS = ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
                    'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod',
                    'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
                    'posterior_variance', 'posterior_log_variance_clipped',
                    'posterior_mean_coef1', 'posterior_mean_coef2')
_SCHEDULE_IGNORE = Ignore('|'.join(SCHEDULE_BUFFERS),
                          'DDPM schedule buffer; recomputed from the config (vd_jax.diffusion)')


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    detect: Callable[[Sequence[str]], bool]
    ignore: Tuple[Ignore, ...] = ()


def _has_prefix(*prefixes):
    return lambda keys: any(k.startswith(prefixes) for k in keys)


LAYOUTS: List[Layout] = [
    Layout('vd-v1.0', "original VD, v1.0 code (`diffuser.*`, `vae.*`, `ctx.*`)",
           _has_prefix('diffuser.', 'vae.image.', 'vae.text.', 'ctx.image.', 'ctx.text.'),
           (_SCHEDULE_IGNORE,)),
    # the Nov-2022 `VD` module: `model.diffusion_model` (the diffuser), `autokl` (LDM
    # AutoencoderKL), `optimus` (optimus_vae) and `clip.model` (ONE HF CLIPModel for both
    # contexts); released files keep only the diffuser and the schedule
    Layout('vd-legacy', "original VD, Nov-2022 code (`model.diffusion_model.*`, `autokl.*`, "
           "`optimus.*`, `clip.model.*`)",
           _has_prefix('model.diffusion_model.', 'autokl.', 'optimus.', 'clip.model.'),
           (_SCHEDULE_IGNORE,
            Ignore(r'clip\.model\.logit_scale',
                   'CLIP contrastive temperature; VD never computes CLIP similarities'))),
    Layout('diffusers', 'a diffusers pipeline or model folder (`image_unet/`, `text_unet/`, '
           '`vae/`, `text_encoder/`, `image_encoder/`)',
           _has_prefix('image_unet.', 'text_unet.', 'vae.', 'text_encoder.', 'image_encoder.')),
]


@dataclasses.dataclass
class PartConverter:
    name: str
    claims: Mapping[str, Tuple[str, ...]]     # layout -> key prefixes this part owns
    has_part: Callable
    target: Callable
    tables: Callable
    export_names: Optional[Callable] = None
    # False for a fixed architecture (the FID Inception): the model config is neither read
    # nor written to the output's config.json
    uses_config: bool = True


REGISTRY: Dict[str, PartConverter] = {}


def register(conv: PartConverter) -> PartConverter:
    REGISTRY[conv.name] = conv
    return conv


def register_layout(layout: Layout, first: bool = False) -> None:
    """Add a source layout (e.g. a stand-alone VAE file). `first` puts it ahead of others."""
    if any(l.name == layout.name for l in LAYOUTS):
        return
    LAYOUTS.insert(0, layout) if first else LAYOUTS.append(layout)


def detect_layout(keys: Sequence[str], where: str = '') -> Layout:
    for layout in LAYOUTS:
        if layout.detect(keys):
            return layout
    sample = sorted(keys)[:8]
    raise CheckpointError(
        f"unknown checkpoint layout{' in ' + where if where else ''}: none of "
        f"{[l.name for l in LAYOUTS]} matches. First keys: {sample}")


# --------------------------------------------------------------------------------------------
# The diffuser
# --------------------------------------------------------------------------------------------

def _diffuser_cfg(model_cfg):
    # lazy: vd_jax.models.unet pulls in jax, flax (+1.0 s)
    from vd_jax.models.unet import DiffuserConfig  # noqa: PLC0415
    return DiffuserConfig.from_dict(model_cfg['diffuser'])


def _diffuser_target(model_cfg):
    # lazy: vd_jax.models.init pulls in jax, flax (+1.0 s)
    from vd_jax.models.init import abstract_params  # noqa: PLC0415
    from vd_jax.models.unet import Diffuser  # noqa: PLC0415
    tree = abstract_params(Diffuser(_diffuser_cfg(model_cfg)))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _diffuser_tables(model_cfg, layout: str, keys: Sequence[str]):
    # lazy: vd_jax.convert.diffuser_rules pulls in jax, flax (+0.9 s)
    from vd_jax.convert.diffuser_rules import diffuser_rows  # noqa: PLC0415
    dcfg = _diffuser_cfg(model_cfg)
    rows = diffuser_rows(dcfg)
    rules = [Rule(r.canonical, r.path, r.transform, exact=True) for r in rows]
    rename, tied = {}, {}
    if layout == 'vd-legacy':
        rename = {r.legacy: r.canonical for r in rows}
    elif layout == 'diffusers':
        rename = {r.diffusers: r.canonical for r in rows}
        # diffusers copies the one shared time MLP into every UNet (its converter reads
        # `model.diffusion_model.time_embed` twice); keep the owner's, require equal copies.
        g = dcfg.global_layer_ptr
        for s in dcfg.streams:
            if 'global' in s.parts:
                continue
            for k in keys:
                if k.startswith(f'{s.name}_unet.time_embedding.'):
                    tied[k] = k.replace(f'{s.name}_unet.', f'{g}_unet.', 1)
    return rules, [], rename, tied


def _diffuser_export_names(model_cfg, layout: str, canonical: Sequence[str]):
    from vd_jax.convert.diffuser_rules import diffuser_rows  # noqa: PLC0415
    dcfg = _diffuser_cfg(model_cfg)
    field = {'vd-v1.0': 'canonical', 'vd-legacy': 'legacy', 'diffusers': 'diffusers'}[layout]
    names = {r.canonical: getattr(r, field) for r in diffuser_rows(dcfg)}
    copies = {}
    if layout == 'diffusers':
        # every diffusers UNet carries the shared time MLP (see `_diffuser_tables`)
        g = dcfg.global_layer_ptr
        owner = [n for n in names.values() if n.startswith(f'{g}_unet.time_embedding.')]
        for s in dcfg.streams:
            if 'global' not in s.parts and 'data' in s.parts:
                copies.update({k.replace(f'{g}_unet.', f'{s.name}_unet.', 1): k for k in owner})
    return names, copies


def _diffuser_claims():
    return {'vd-v1.0': ('diffuser.',), 'vd-legacy': ('model.diffusion_model.',),
            'diffusers': ('image_unet.', 'text_unet.')}


register(PartConverter('diffuser', _diffuser_claims(), lambda cfg: 'diffuser' in cfg,
                       _diffuser_target, _diffuser_tables, _diffuser_export_names))
