"""The whole released four-flow checkpoint (every part) maps strictly, at full size, without
allocating: the key listing's shapes against `jax.eval_shape` of every vd_jax module."""

import listing
import numpy as np
import pytest

from vd_jax.convert import plan_conversion
from vd_jax.convert.sources import ShapeSource



@pytest.mark.slow
def test_every_key_of_the_released_checkpoint_is_accounted_for():
    shapes = listing.shapes()
    assert len(shapes) == 3175
    layout, plans, targets, record = plan_conversion(ShapeSource(shapes), 'vd_four_flow')
    assert layout.name == 'vd-v1.0'
    assert set(plans) == {'diffuser', 'vae_image', 'vae_text', 'ctx_image', 'ctx_text'}
    converted = {e.source_key for p in plans.values() for e in p.entries}
    ignored = {k for k, _ in record['ignored']} | {k for p in plans.values() for k, _ in p.ignored}
    tied = {k for p in plans.values() for k, _ in p.tied}
    assert not (converted & ignored) and not (converted & tied)
    assert converted | ignored | tied == set(shapes)  # nothing unaccounted for
    counts = {p: int(sum(np.prod(s) for s in t.values())) for p, t in targets.items()}
    assert counts == {'diffuser': 2_566_318_852, 'vae_image': 83_653_863,
                      'vae_text': 109_489_920 + 132_109_824, 'ctx_image': 303_966_208,
                      'ctx_text': 123_650_304}
    # what is ignored is ignored by name, with a reason: schedule buffers, the unused CLIP
    # towers and their logit_scale / position_ids, GPT-2's causal-mask buffers
    reasons = dict(record['ignored'] + [i for p in plans.values() for i in p.ignored])
    assert all(reasons.values())
    assert 'betas' in reasons and 'ctx.text.model.vision_model.post_layernorm.weight' in reasons
    assert 'vae.text.decoder.transformer.h.0.attn.bias' in reasons
    assert tied == {'vae.text.decoder.lm_head.weight'}
