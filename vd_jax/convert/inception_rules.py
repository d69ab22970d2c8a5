"""Conversion table of the FID InceptionV3 (part `inception`, layout `fid-inception`).

Source: the public FID weights `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid; the same
file is torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`), a flat state dict of
`Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`,
`Mixed_5b.branch1x1.conv.weight`, ... and the 1008-way `fc.weight`/`fc.bias`.

Every conv is bias-free (OIHW -> HWIO); every BatchNorm keeps its four tensors under mirrored
names (`weight` -> `scale`, the running statistics as they are). Ignored by name: `fc.*` (the
classifier: FID uses the pool3 features before it) and `*.num_batches_tracked` (the training
step counter newer PyTorch versions add to every BatchNorm). The layout is detected from the
first and last blocks' keys; the architecture is fixed, so the part ignores the model config.

The same key names are used by torchvision's ImageNet `Inception3`, whose weights give other
(non-standard) FIDs; its `AuxLogits.*` keys make such a file fail to convert, but an
`aux_logits=False` copy would not: convert the FID file.
"""
from __future__ import annotations

from typing import List, Sequence

from vd_jax.checkpoint import flatten
from vd_jax.convert.engine import Ignore, Rule
from vd_jax.convert.parts import Layout, PartConverter, register, register_layout
from vd_jax.convert.transforms import CONV, IDENTITY

PART = 'inception'
LAYOUT = 'fid-inception'
# Key prefixes of the FID file; all belong to the one part.
PREFIXES = ('Conv2d_', 'Mixed_', 'fc.')

_STEM = r'(Conv2d_[0-9][a-z]_[0-9]x[0-9])'
_BRANCH = r'(Mixed_[0-9][a-z])\.(branch[0-9a-z_]+)'
_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'running_mean',
       'running_var': 'running_var'}


def rules() -> List[Rule]:
    """FID-file keys -> `vd_jax.models.inception.InceptionV3` paths."""
    out = [Rule(_STEM + r'\.conv\.weight', r'\1/conv/kernel', CONV),
           Rule(_BRANCH + r'\.conv\.weight', r'\1/\2/conv/kernel', CONV)]
    for src, dst in _BN.items():
        out += [Rule(_STEM + rf'\.bn\.{src}', rf'\1/bn/{dst}', IDENTITY),
                Rule(_BRANCH + rf'\.bn\.{src}', rf'\1/\2/bn/{dst}', IDENTITY)]
    return out


def ignore_list() -> List[Ignore]:
    return [
        Ignore(r'fc\.(weight|bias)', 'the 1008-way classifier after pool3; FID uses the pool3 '
               'features'),
        Ignore(r'.*\.bn\.num_batches_tracked', 'BatchNorm training step counter (added by '
               'PyTorch >= 0.4.1); unused at inference'),
    ]


def _detect(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return 'Conv2d_1a_3x3.conv.weight' in ks and 'Mixed_7c.branch_pool.conv.weight' in ks


def _target(model_cfg):
    # lazy: vd_jax.models.inception pulls in jax, flax (+0.8 s)
    from vd_jax.models.inception import abstract_params  # noqa: PLC0415
    return {k: tuple(v.shape) for k, v in flatten(abstract_params()).items()}


def _tables(model_cfg, layout: str, keys: Sequence[str]):
    return rules(), ignore_list(), {}, {}


register_layout(Layout(
    LAYOUT, 'FID InceptionV3 weights (`pt_inception-2015-12-05-6726825d.pth`: `Conv2d_*`, '
    '`Mixed_*`, `fc.*`)', _detect), first=True)
register(PartConverter(PART, {LAYOUT: PREFIXES}, lambda cfg: True, _target, _tables,
                       uses_config=False))
