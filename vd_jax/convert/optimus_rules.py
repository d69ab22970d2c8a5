"""Conversion tables of the text VAE (part `vae_text`, `vd_jax.models.optimus.Optimus`).

Canonical names are the state-dict names of `optimus_vae_next` (what `optimus-vae.pth`
holds at top level and the v1.0 four-flow checkpoint under `vae.text.`):
  * `encoder.{embeddings,encoder.layer.N,pooler}.*`, `encoder.linear.weight`: BERT
    (`nn.Linear` weights (out, in) -> kernels (in, out)); note there is no `bert.` level;
  * `decoder.transformer.{wte,wpe,h.N,ln_f}.*`, `decoder.transformer.linear{,_emb}.weight`:
    GPT-2, whose `Conv1D` weights are already (in, out) (identity);
  * `decoder.transformer.h.N.attn.bias` (and `attn.masked_bias` of later GPT-2 code):
    causal-mask buffers, ignored by name;
  * `decoder.lm_head.weight`: the tied copy of `decoder.transformer.wte.weight`; checked
    equal when read, then skipped (the model computes logits with `wte`).
Source layouts: `vd-v1.0` (prefix `vae.text.`), `vd-legacy` (prefix `optimus.`: the
Nov-2022 `VD.optimus`, an `optimus_vae` with the same names) and the stand-alone `optimus` layout of
`optimus-vae.pth` (no prefix; detected by `decoder.transformer.wte.weight`, which the
`encoder.`/`decoder.` keys of `kl-f8.pth` never have). In a diffusers folder (which has no
Optimus class) the part is `vae_text.safetensors` beside the sub-folders, in the v1.0 names;
`vd_jax.convert.sources` reads its keys as `vae_text.<canonical name>`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from vd_jax.checkpoint import flatten
from vd_jax.convert.engine import Ignore, Rule
from vd_jax.convert.parts import Layout, PartConverter, register, register_layout
from vd_jax.convert.transforms import IDENTITY, LINEAR

PART = 'vae_text'
PREFIX = {'vd-v1.0': 'vae.text.', 'vd-legacy': 'optimus.', 'optimus': '',
          'diffusers': 'vae_text.'}
TIED = ('decoder.lm_head.weight', 'decoder.transformer.wte.weight')
# keys of other model families: a file holding any of these is not a stand-alone Optimus file
_FOREIGN = ('diffuser.', 'model.diffusion_model.', 'vae.', 'ctx.', 'quant_conv.',
            'post_quant_conv.', 'first_stage_model.', 'cond_stage_model.', 'autokl.',
            'optimus.', 'clip.')


def _wb(src: str, dst: str, weight=LINEAR, weight_leaf='kernel') -> List[Rule]:
    """weight + bias of one layer (`src`, `dst` are regexes / templates without the leaf)."""
    return [Rule(src + r'\.weight', f'{dst}/{weight_leaf}', weight),
            Rule(src + r'\.bias', f'{dst}/bias', IDENTITY)]


def _norm(src, dst):
    return _wb(src, dst, IDENTITY, 'scale')


def optimus_rules() -> List[Rule]:
    """Canonical key regex -> Flax path of every Optimus parameter."""
    e, le = r'encoder\.encoder\.layer\.(\d+)', r'encoder/encoder/layer_\1'
    h, lh = r'decoder\.transformer\.h\.(\d+)', r'decoder/transformer/h_\1'
    rules = [
        Rule(r'encoder\.embeddings\.(word|position|token_type)_embeddings\.weight',
             r'encoder/embeddings/\1_embeddings/embedding', IDENTITY),
        *_norm(r'encoder\.embeddings\.LayerNorm', 'encoder/embeddings/LayerNorm'),
        *_wb(e + r'\.attention\.self\.(query|key|value)', le + r'/attention/self/\2'),
        *_wb(e + r'\.attention\.output\.dense', le + '/attention/output/dense'),
        *_norm(e + r'\.attention\.output\.LayerNorm', le + '/attention/output/LayerNorm'),
        *_wb(e + r'\.intermediate\.dense', le + '/intermediate/dense'),
        *_wb(e + r'\.output\.dense', le + '/output/dense'),
        *_norm(e + r'\.output\.LayerNorm', le + '/output/LayerNorm'),
        *_wb(r'encoder\.pooler\.dense', 'encoder/pooler/dense'),
        Rule(r'encoder\.linear\.weight', 'encoder/linear/kernel', LINEAR),
        Rule(r'decoder\.transformer\.(wte|wpe)\.weight', r'decoder/transformer/\1/embedding',
             IDENTITY),
        *_norm(h + r'\.ln_(1|2)', lh + r'/ln_\2'),
        # GPT-2 Conv1D: weight stored (in, out) = our kernel layout
        *_wb(h + r'\.attn\.(c_attn|c_proj)', lh + r'/attn/\2', IDENTITY),
        *_wb(h + r'\.mlp\.(c_fc|c_proj)', lh + r'/mlp/\2', IDENTITY),
        *_norm(r'decoder\.transformer\.ln_f', 'decoder/transformer/ln_f'),
        Rule(r'decoder\.transformer\.(linear|linear_emb)\.weight',
             r'decoder/transformer/\1/kernel', LINEAR),
    ]
    return rules


def ignore_list() -> List[Ignore]:
    return [Ignore(r'decoder\.transformer\.h\.\d+\.attn\.(bias|masked_bias)',
                   'GPT-2 causal-mask buffer (tril of ones (1,1,n_ctx,n_ctx) / the -1e4 '
                   'constant): not a parameter; the mask is computed from positions')]


def rename_map(layout: str, keys: Sequence[str]) -> Dict[str, str]:
    pre = PREFIX[layout]
    return {k: k[len(pre):] for k in keys if pre and k.startswith(pre)}


def tied_map(layout: str, keys: Sequence[str]) -> Dict[str, str]:
    pre = PREFIX[layout]
    head, wte = pre + TIED[0], pre + TIED[1]
    return {head: wte} if head in set(keys) else {}


def export_names(model_cfg, layout: str, canonical: Sequence[str]):
    """Canonical name -> name in `layout`, plus GPT-2's tied `lm_head` as a copy of `wte`
    (the original module has both)."""
    pre = PREFIX[layout]
    return {k: pre + k for k in canonical}, {pre + TIED[0]: pre + TIED[1]}


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def _section(model_cfg):
    vae = model_cfg['vae'] if 'vae' in model_cfg else None
    return vae['text'] if vae is not None and 'text' in vae else None


def _target(model_cfg):
    # lazy: vd_jax.models.init pulls in jax, flax (+1.0 s)
    from vd_jax.models.init import abstract_params  # noqa: PLC0415
    # lazy: vd_jax.models.optimus pulls in jax, flax (+0.9 s)
    from vd_jax.models.optimus import Optimus  # noqa: PLC0415
    tree = abstract_params(Optimus(_section(model_cfg)))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _tables(model_cfg, layout: str, keys: Sequence[str]):
    return optimus_rules(), ignore_list(), rename_map(layout, keys), tied_map(layout, keys)


def _detect_optimus(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return ('decoder.transformer.wte.weight' in ks
            and not any(k.startswith(_FOREIGN) for k in keys))


register_layout(Layout(
    'optimus', 'stand-alone Optimus VAE (`optimus-vae.pth`: `encoder.*` BERT, '
    '`decoder.transformer.*` GPT-2, `decoder.lm_head.weight`)', _detect_optimus), first=True)

register(PartConverter(PART, {'vd-v1.0': ('vae.text.',), 'vd-legacy': ('optimus.',),
                              'optimus': ('encoder.', 'decoder.'), 'diffusers': ('vae_text.',)},
                       lambda cfg: _section(cfg) is not None, _target, _tables, export_names))
