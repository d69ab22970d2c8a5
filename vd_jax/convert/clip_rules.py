"""Conversion tables of the CLIP context encoders (parts `ctx_text` and `ctx_image`).

Source layouts:
  * `vd-v1.0`: `ctx.text.model.*` and `ctx.image.model.*`, each a FULL HF `CLIPModel`
    (both towers, both projections, `logit_scale`, and with transformers <= 4.30 the int64
    `position_ids` buffers). Each part converts its own tower; the other tower, `logit_scale`
    and `position_ids` are ignored by name, with the reason recorded in the manifest.
  * `vd-legacy`: `clip.model.*`, ONE full `CLIPModel` (the Nov-2022 `VD.clip`, `FrozenCLIP`)
    serving both contexts: `ctx_text` claims its text tower and `text_projection`,
    `ctx_image` its vision tower and `visual_projection` (`logit_scale` is ignored by the layout).
  * `diffusers`: `text_encoder.*` = `CLIPTextModelWithProjection`, `image_encoder.*` =
    `CLIPVisionModelWithProjection`.
Keys are renamed onto the CLIPModel names (`text_model.…`, `text_projection.weight`,
`vision_model.…`, `visual_projection.weight`). transformers >= 5.6 saves a bare
`CLIPTextModel`/`CLIPVisionModel` without the `text_model.`/`vision_model.` level (anchors
§1.6); such flat keys get the level back, so both variants convert. (A bare tower has no
projection; the conversion then fails naming `text_projection/kernel` or
`visual_projection/kernel` as missing.)
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

from vd_jax.checkpoint import flatten
from vd_jax.convert.engine import Ignore, Rule
from vd_jax.convert.parts import PartConverter, register
from vd_jax.convert.transforms import CONV, IDENTITY, LINEAR

# Per part: its tower and projection, the other tower and projection (ignored), the
# `cfg.model.ctx` section, the key prefixes it claims in each layout, the prefix that
# `rename_map` strips, and the first names of a flat (level-less) tower.
_PARTS = {
    'ctx_text': dict(tower='text_model', proj='text_projection', other='vision_model',
                     other_proj='visual_projection', section='text',
                     claims={'vd-v1.0': ('ctx.text.',), 'diffusers': ('text_encoder.',),
                             'vd-legacy': ('clip.model.text_model.', 'clip.model.text_projection.')},
                     strip={'vd-v1.0': 'ctx.text.model.', 'diffusers': 'text_encoder.',
                            'vd-legacy': 'clip.model.'},
                     flat=('embeddings.', 'encoder.', 'final_layer_norm.')),
    'ctx_image': dict(tower='vision_model', proj='visual_projection', other='text_model',
                      other_proj='text_projection', section='image',
                      claims={'vd-v1.0': ('ctx.image.',), 'diffusers': ('image_encoder.',),
                              'vd-legacy': ('clip.model.vision_model.',
                                            'clip.model.visual_projection.')},
                      strip={'vd-v1.0': 'ctx.image.model.', 'diffusers': 'image_encoder.',
                             'vd-legacy': 'clip.model.'},
                      flat=('embeddings.', 'pre_layrnorm.', 'encoder.', 'post_layernorm.')),
}


def _encoder_rules(tower: str) -> List[Rule]:
    t = re.escape(tower)
    layer = rf'{t}\.encoder\.layers\.(\d+)\.'
    out = f'{tower}/encoder/layers_\\1/'
    return [
        Rule(layer + r'self_attn\.(q|k|v|out)_proj\.weight', out + r'self_attn/\2_proj/kernel', LINEAR),
        Rule(layer + r'self_attn\.(q|k|v|out)_proj\.bias', out + r'self_attn/\2_proj/bias', IDENTITY),
        Rule(layer + r'layer_norm(1|2)\.weight', out + r'layer_norm\2/scale', IDENTITY),
        Rule(layer + r'layer_norm(1|2)\.bias', out + r'layer_norm\2/bias', IDENTITY),
        Rule(layer + r'mlp\.fc(1|2)\.weight', out + r'mlp/fc\2/kernel', LINEAR),
        Rule(layer + r'mlp\.fc(1|2)\.bias', out + r'mlp/fc\2/bias', IDENTITY),
    ]


def _norm(key: str, path: str) -> List[Rule]:
    return [Rule(f'{key}.weight', f'{path}/scale', IDENTITY, exact=True),
            Rule(f'{key}.bias', f'{path}/bias', IDENTITY, exact=True)]


def text_rules() -> List[Rule]:
    """CLIPModel text-tower keys -> `CLIPTextContext` paths."""
    e = 'text_model.embeddings'
    return ([Rule(f'{e}.token_embedding.weight', 'text_model/embeddings/token_embedding/embedding',
                  IDENTITY, exact=True),
             Rule(f'{e}.position_embedding.weight',
                  'text_model/embeddings/position_embedding/embedding', IDENTITY, exact=True)]
            + _encoder_rules('text_model')
            + _norm('text_model.final_layer_norm', 'text_model/final_layer_norm')
            + [Rule('text_projection.weight', 'text_projection/kernel', LINEAR, exact=True)])


def vision_rules() -> List[Rule]:
    """CLIPModel vision-tower keys -> `CLIPImageContext` paths."""
    e, f = 'vision_model.embeddings', 'vision_model/embeddings'
    return ([Rule(f'{e}.class_embedding', f'{f}/class_embedding', IDENTITY, exact=True),
             Rule(f'{e}.patch_embedding.weight', f'{f}/patch_embedding/kernel', CONV, exact=True),
             Rule(f'{e}.position_embedding.weight', f'{f}/position_embedding/embedding', IDENTITY,
                  exact=True)]
            + _norm('vision_model.pre_layrnorm', 'vision_model/pre_layrnorm')
            + _encoder_rules('vision_model')
            + _norm('vision_model.post_layernorm', 'vision_model/post_layernorm')
            + [Rule('visual_projection.weight', 'visual_projection/kernel', LINEAR, exact=True)])


def ignore_list(part: str) -> List[Ignore]:
    """Keys of a full CLIPModel that a part deliberately does not convert, with the reason."""
    p = _PARTS[part]
    mine = p['section']
    return [
        Ignore(re.escape(p['other']) + r'\..*',
               f"{p['other']} of the CLIPModel stored in ctx.{mine}: VD's {mine} context encoder "
               f"uses only the {p['tower']} (SHI-Labs lib/model_zoo/clip.py)"),
        Ignore(re.escape(p['other_proj']) + r'\.weight',
               f"{p['other_proj']} of the CLIPModel stored in ctx.{mine}: unused by VD's {mine} "
               'context encoder'),
        Ignore('logit_scale', 'CLIP contrastive temperature; VD never computes CLIP similarities'),
        Ignore(r'(text_model|vision_model)\.embeddings\.position_ids',
               'int64 buffer arange(n) saved by transformers <= 4.30; positions are implicit'),
    ]


def rename_map(part: str, layout: str, keys: Sequence[str]) -> Dict[str, str]:
    """Source key -> CLIPModel key (prefix stripped; flat tower keys given their level)."""
    p = _PARTS[part]
    prefix = p['strip'][layout]
    out = {}
    for k in keys:
        if not k.startswith(prefix):
            continue  # left as is: reported as an unexpected key
        rest = k[len(prefix):]
        if layout == 'diffusers' and rest.startswith(p['flat']):
            rest = f"{p['tower']}.{rest}"
        out[k] = rest
    return out


def _model_cfg_section(model_cfg, section):
    ctx = model_cfg['ctx'] if 'ctx' in model_cfg else {}
    return ctx[section] if section in ctx else None


def _target(part):
    def target(model_cfg):
        # lazy: vd_jax.models pulls in jax, flax (+0.7 s)
        from vd_jax.models import family  # noqa: PLC0415
        # lazy: vd_jax.models.init pulls in jax, flax (+0.9 s)
        from vd_jax.models.init import abstract_params  # noqa: PLC0415
        sec = _model_cfg_section(model_cfg, _PARTS[part]['section'])
        module = family('clip_text' if part == 'ctx_text' else 'clip_vision').build(sec)
        return {k: tuple(v.shape) for k, v in flatten(abstract_params(module)).items()}
    return target


def _tables(part):
    def tables(model_cfg, layout: str, keys: Sequence[str]):
        rules = text_rules() if part == 'ctx_text' else vision_rules()
        return rules, ignore_list(part), rename_map(part, layout, keys), {}
    return tables


def _export_names(part):
    def names(model_cfg, layout: str, canonical: Sequence[str]):
        # CLIPModel names under the layout's prefix; the ...WithProjection classes of
        # transformers 5 keep the `text_model.`/`vision_model.` level
        return {k: _PARTS[part]['strip'][layout] + k for k in canonical}, {}
    return names


for _part, _p in _PARTS.items():
    register(PartConverter(
        _part, _p['claims'],
        (lambda section: lambda cfg: _model_cfg_section(cfg, section) is not None)(_p['section']),
        _target(_part), _tables(_part), _export_names(_part)))
