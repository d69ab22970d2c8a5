"""The stage runner's pre-encoded world (`vd_jax.train.stages.preencode_world`): the VD stages
read the shapes world encoded once by the stage-0 exports instead of running the frozen
encoders at every step. The trainer's own input step must give the same batches either way.

Reference: the input step of a run with the encoders in the loop (`data.kind=shapes`,
`vd_jax.train.run.global_batch`: host prep, then the frozen encoders on device) on the same
records. Both run the same float32 encoders on batches of the same size, stored as float32,
so the fields agree to 1e-5 (summation order).
"""
import json
import os

import jax
import numpy as np
import pytest

from vd_jax.pipeline import MODELS

SHIPPED = MODELS['vd-mini']
EXPORTS = {'autokl': SHIPPED, 'clip': SHIPPED, 'optimus': SHIPPED}
SMALL = ['data.num_records=64', 'batch_size=8', 'validation.every=0']


def _first_batch(cfg, workdir):
    from vd_jax.train import run as R
    run = R.setup(cfg, workdir)
    it = iter(run.loader)
    batch = R.global_batch(run, it, 0, R.encoder_key(cfg))
    return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}


@pytest.mark.slow
def test_preencoded_world_gives_the_loops_batches(tmp_path):
    from vd_jax.config import load_config
    from vd_jax.train.settings import apply_overrides
    from vd_jax.train.stages import RECIPE, preencode_world, stage_overrides
    work = str(tmp_path / 'work')
    rec = preencode_world(work, SMALL, EXPORTS)
    assert rec['records'] == 64 and rec['seconds'] > 0
    assert not os.path.isabs(rec['path'])
    # the same stage-0 exports and world again: reused, not re-encoded
    assert preencode_world(work, SMALL, EXPORTS) == dict(rec, seconds=0.0)

    def cfg(encoded):
        c = load_config(f'{RECIPE}:four_flow')
        extra = (['data.kind=encoded', f"data.path={os.path.join(work, rec['path'])}"]
                 if encoded else [])
        apply_overrides(c, [f"data.path={os.path.join(work, 'data')}", 'init.method=random']
                        + stage_overrides('four_flow', SMALL, EXPORTS, init=False) + extra)
        return c
    live = _first_batch(cfg(False), str(tmp_path / 'live'))
    stored = _first_batch(cfg(True), str(tmp_path / 'stored'))
    fields = ('latent_image', 'latent_text', 'context_image', 'context_text')
    assert set(fields) <= set(live) and set(live) == set(stored), (sorted(live), sorted(stored))
    np.testing.assert_array_equal(live['index'], stored['index'])   # the same records, in order
    for f in fields:
        assert live[f].shape == stored[f].shape, f
        np.testing.assert_allclose(stored[f], live[f], atol=1e-5, rtol=1e-5, err_msg=f)
    # a stage-0 export with other weights: another dataset (named by the weights, not paths)
    other = tmp_path / 'other_autokl'
    other.mkdir()
    for f in os.listdir(SHIPPED):
        data = open(os.path.join(SHIPPED, f), 'rb').read()
        if f == 'vae_image.safetensors':
            data = data[:-2] + bytes([data[-2] ^ 1, data[-1]])   # one weight's low bits
        (other / f).write_bytes(data)
    rec2 = preencode_world(work, SMALL, dict(EXPORTS, autokl=str(other)))
    assert rec2['path'] != rec['path'] and rec2['seconds'] > 0
    with open(os.path.join(work, rec['path'], '1.0.0', 'dataset_info.json')) as f:
        assert json.load(f)['name'] == 'vd_encoded'


def test_every_stage_is_checked_as_it_will_run_before_the_first_starts(tmp_path):
    """`run_stages` checks every stage's settings (the VD stages on the pre-encoded world)
    before the first stage: a setting a later stage refuses fails at once, with nothing
    written, not after the hour of stage 0 (the validation metric 'shapes' on
    data.kind='encoded' was refused only when VD-basic started)."""
    from vd_jax.errors import ConfigError
    from vd_jax.train.stages import STAGE0, VD_STAGES, preflight, run_stages
    work = tmp_path / 'work'
    preflight(str(work), STAGE0 + VD_STAGES)                    # the recipe as it runs
    preflight(str(work), STAGE0 + VD_STAGES, encoders_in_loop=True)
    with pytest.raises(ConfigError, match=r"stage dc: validation.metrics: unknown \['bogus'\]"):
        run_stages(str(work), ['dc.validation.metrics=["bogus"]'])
    with pytest.raises(ConfigError, match='stage optimus: .*optimus.sampled_softmax'):
        run_stages(str(work), ['optimus.optimus.sampled_softmax=-1'])
    assert not work.exists()


def test_the_shapes_metric_needs_the_world_or_the_world_pre_encoded():
    from vd_jax.config import load_config
    from vd_jax.errors import ConfigError
    from vd_jax.train import validation
    from vd_jax.train.stages import RECIPE
    cfg = load_config(f'{RECIPE}:dc')
    assert cfg.validation.every > 0 and 'shapes' in cfg.validation.metrics
    for kind in ('shapes', 'encoded'):
        cfg.data.kind = kind
        validation.check(cfg)
    cfg.data.kind = 'images'
    with pytest.raises(ConfigError, match=r"'shapes' needs data.kind in \['shapes', 'encoded'\], "
                                          r"got 'images'"):
        validation.check(cfg)
