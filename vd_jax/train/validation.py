"""Validation during training: sample a small fixed set with the current EMA weights.

Every `cfg.validation.every` steps (0: never) the diffuser's EMA weights and the frozen
encoders become a `VersatileDiffusion`; each trained flow samples a fixed set (the same
prompts, images and seeds every time), grids go to `<workdir>/validation/step_<N>/` (PNG)
and TensorBoard, and the configured metrics into metrics.jsonl as `val/...`:

  shapes       attribute accuracy per flow on held-out shapes-world samples
               (`vd_jax.eval.shapes_eval`, which draws its own held-out combinations; the
               data must be the shapes world or the world pre-encoded, data.kind='encoded',
               as `python -m vd_jax.train.stages` trains the VD stages)
  clip_score   CLIP score of text->image samples of `validation.prompts` with the run's own
               CLIP towers (`vd_jax.eval.clip_score`)
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

import numpy as np

from vd_jax.errors import ConfigError
from vd_jax.eval.clip_score import CLIPScorer
from vd_jax.outputs import make_grid

logger = logging.getLogger(__name__)

METRICS = ('shapes', 'clip_score')
# data the 'shapes' metric applies to: the world, or the world pre-encoded by the stage runner
SHAPES_DATA = ('shapes', 'encoded')
# the shapes evaluation's name of each trained flow
_SHAPES_FLOWS = {'t2i': 't2i', 'i2t': 'i2t', 'i2i': 'i2i', 't2t': 't2t'}


def check(cfg) -> None:
    v = cfg.get('validation', {}) or {}
    if int(v.get('every', 0) or 0) <= 0:
        return
    bad = [m for m in v.get('metrics', ()) if m not in METRICS]
    if bad:
        raise ConfigError(f'validation.metrics: unknown {bad}; choose from {list(METRICS)}')
    if 'shapes' in v.get('metrics', ()) and cfg.data.kind not in SHAPES_DATA:
        raise ConfigError(f"validation metric 'shapes' needs data.kind in {list(SHAPES_DATA)}, "
                          f"got {cfg.data.kind!r}")
    if str(cfg.get('objective', 'diffusion')) != 'diffusion':
        raise ConfigError('validation samples the diffuser: set validation.every=0 for the '
                          f"'{cfg.objective}' objective")


def validate(cfg, ema_params, frozen, step: int, workdir: str) -> Tuple[Dict[str, float],
                                                                      Dict[str, np.ndarray]]:
    """({'val/...': value}, {tag: grid image (H, W, 3) in [0, 1]}) for the current weights."""
    # lazy: vd_jax.pipeline pulls in 18 modules (+25 ms)
    from vd_jax.pipeline import VersatileDiffusion  # noqa: PLC0415
    v = cfg.validation
    params = {'diffuser': ema_params, **(frozen.params if frozen is not None else {})}
    vd = VersatileDiffusion(cfg.model, params, source=f'training step {step}')
    out_dir = os.path.join(workdir, 'validation', f'step_{step}')
    flows = [f for f in cfg.flows if f in _SHAPES_FLOWS]
    metrics: Dict[str, float] = {}
    grids: Dict[str, np.ndarray] = {}
    if 'shapes' in v.metrics:
        # lazy: vd_jax.eval.shapes_eval pulls in tensorflow_datasets, grain, orbax, ... (+0.6 s)
        from vd_jax.eval.shapes_eval import EvalSettings, evaluate  # noqa: PLC0415
        s = EvalSettings(n=int(v.n), steps=int(v.steps), scale=float(v.scale), seed=0,
                         batch_size=int(v.n), flows=tuple(_SHAPES_FLOWS[f] for f in flows))
        rec = evaluate(vd, s, out_dir, log=logger.info)
        for name, r in rec['flows'].items():
            acc = r.get('accuracy') or r.get('preserved') or {}
            for field, value in acc.items():
                metrics[f'val/{name}/{field}'] = float(value)
    if 'clip_score' in v.metrics and 't2i' in flows and list(v.prompts):
        images = vd.text_to_image(list(v.prompts), 1, steps=int(v.steps), scale=float(v.scale))
        scorer = CLIPScorer(params['ctx_text'], params['ctx_image'], cfg.model.ctx.text,
                            cfg.model.ctx.image)
        metrics['val/t2i/clip_score'] = float(np.mean(scorer.clip_score(list(v.prompts), images)))
        grids['val/t2i_prompts'] = make_grid(images)
    if os.path.isdir(out_dir):
        # lazy: PIL (+8 ms)
        from PIL import Image  # noqa: PLC0415
        for name in sorted(os.listdir(out_dir)):
            if name.endswith('.png'):
                grids[f'val/{name[:-4]}'] = np.asarray(
                    Image.open(os.path.join(out_dir, name)).convert('RGB'), np.float32) / 255.0
    return metrics, grids
