"""Manifests name no folder of the machine that made them: an export records where its frozen
parts came from relative to its run folder, a release (`python -m vd_jax.train.stages
--release`) every path relative to the stages' work folder, and the shipped VD-mini manifest
has no absolute path.
"""
import json
import os
import types

import flax.linen as nn

from vd_jax.pipeline import MODELS
from vd_jax.train.manifest_paths import absolute_paths, relative_to, resolved_from


def test_relative_paths_of_lists_and_back(tmp_path):
    a, b = str(tmp_path / 'work' / 'autokl' / 'x'), str(tmp_path / 'old' / 'clip' / 'x')
    rel = relative_to(f'{a},{b},random', tmp_path / 'work' / 'four_flow')
    assert rel == '../autokl/x,../../old/clip/x,random'
    assert resolved_from(rel, tmp_path / 'work' / 'four_flow') == f'{a},{b},random'
    assert absolute_paths({'x': [rel], 'y': {'z': f'random,{a}'}}) == [f'/y/z: random,{a}']


def test_shipped_manifest_has_no_absolute_path():
    with open(os.path.join(MODELS['vd-mini'], 'manifest.json')) as f:
        manifest = json.load(f)
    assert absolute_paths(manifest) == []
    assert manifest['released_from'] == 'four_flow/export/step_3500'
    assert manifest['stages']['autokl']['export'] == 'autokl/export/step_1500'
    # (v3: every stage-0 export in the stages work folder; v2's reused two of v1's, in
    # '../vd_mini')
    assert set(manifest['frozen_parts_from'].values()) == {
        'autokl/export/step_1500,clip/export/step_2500,optimus/export/step_2000'}


def _export_final_stage(work, encoder_dirs):
    """`export_ema` of the tiny diffuser (random weights) as the four_flow stage of `work`,
    with frozen parts said to come from `encoder_dirs` (absolute, as `stages` passes them)."""
    from vd_jax.components import Components
    from vd_jax.config import load_config
    from vd_jax.models.init import random_params
    from vd_jax.train import export_ema, make_model
    from vd_jax.train.settings import StepConfig
    from vd_jax.train.step import abstract_boxed_params
    cfg = load_config('train_tiny:test')
    sc = StepConfig.from_config(cfg, make_model(cfg))
    ema = random_params(nn.unbox(abstract_boxed_params(sc)), seed=0)
    vae = random_params(Components(cfg.model, {}).abstract_params(['vae_image'])['vae_image'])
    encoders = types.SimpleNamespace(params={'vae_image': vae}, ckpt=','.join(encoder_dirs))
    run = os.path.join(work, 'four_flow')
    return export_ema(cfg, ema, os.path.join(run, 'export', 'step_2'), 2, encoders=encoders,
                      objective=sc.objective, run_dir=run)


def test_export_and_release_record_relative_paths(tmp_path):
    from vd_jax.train.stages import release
    work = str(tmp_path / 'runs' / 'vd_mini2')
    exports = {'autokl': os.path.join(work, 'autokl', 'export', 'step_1'),
               'clip': str(tmp_path / 'runs' / 'vd_mini' / 'clip' / 'export' / 'step_1'),
               'optimus': os.path.join(work, 'optimus', 'export', 'step_1')}
    for d in exports.values():
        os.makedirs(d)
    final = _export_final_stage(work, list(exports.values()))
    with open(os.path.join(final, 'manifest.json')) as f:
        exported = json.load(f)
    assert absolute_paths(exported) == []
    assert exported['frozen_parts_from'] == {'vae_image': (
        '../autokl/export/step_1,../../vd_mini/clip/export/step_1,../optimus/export/step_1')}
    exports['four_flow'] = final
    with open(os.path.join(work, 'stages.json'), 'w') as f:  # as run_stages writes it
        json.dump({s: {'export': d, 'seconds': 1.0, 'steps': 1} for s, d in exports.items()}, f)
    os.symlink(final, os.path.join(work, 'final'))
    out = release(work, str(tmp_path / 'released'), 'test release')
    with open(os.path.join(out, 'manifest.json')) as f:
        released = json.load(f)
    assert absolute_paths(released) == [], absolute_paths(released)
    assert released['released_from'] == 'four_flow/export/step_2'
    assert released['frozen_parts_from'] == {'vae_image': (
        'autokl/export/step_1,../vd_mini/clip/export/step_1,optimus/export/step_1')}
    assert released['stages']['clip']['export'] == '../vd_mini/clip/export/step_1'
    assert released['stages']['four_flow'] == {'export': 'four_flow/export/step_2',
                                               'seconds': 1.0, 'steps': 1}
