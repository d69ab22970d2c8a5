"""VD-mini: the shipped default model (vd_jax/weights/vd_mini, docs/vd-mini.md) and the recipe
that rebuilds it (configs/train_vd_mini.py through `python -m vd_jax.train.stages`).

- the shipped weights: within the 30 MB budget, float16 storage, every part of the four flows,
  and the stage record in the manifest;
- a reduced gate: the shipped model on a small held-out sample of the shapes world (prompts and
  images it never saw in training), read back from pixels / parsed from its captions;
- the whole recipe end to end on a reduced budget (a few hundred steps
  per stage): every stage runs, hands its export to the next, and text->image learns what
  such a budget learns first (the asked background) above chance. About 17 minutes on 2
  Zen 4 cores beside another run of it (2026-12-07).
"""
import json
import os
import time

import numpy as np
import pytest

from vd_jax.pipeline import MODELS

SHIPPED = MODELS['vd-mini']
FOUR_FLOW_PARTS = {'diffuser', 'vae_image', 'vae_text', 'ctx_text', 'ctx_image'}


def test_shipped_weights_fit_the_budget():
    files = {f: os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED)}
    assert sum(files.values()) <= 30 * 2 ** 20, files
    assert {f[:-len('.safetensors')] for f in files if f.endswith('.safetensors')} \
        == FOUR_FLOW_PARTS
    from vd_jax.checkpoint import read_safetensors_header
    for f in files:
        if f.endswith('.safetensors'):
            header, _ = read_safetensors_header(os.path.join(SHIPPED, f))
            dtypes = {v['dtype'] for k, v in header.items() if k != '__metadata__'}
            assert dtypes == {'F16'}, (f, dtypes)
    with open(os.path.join(SHIPPED, 'manifest.json')) as fh:
        manifest = json.load(fh)
    assert set(manifest['stages']) == {'autokl', 'clip', 'optimus', 'basic', 'dc', 'four_flow'}
    assert manifest['flows'] == ['t2i', 'i2i', 'i2t', 't2t']
    assert manifest['name'] == 'VD-mini v3' and manifest['data'] == 'shapes'


@pytest.fixture(scope='module')
def vd_mini():
    from vd_jax.pipeline import VersatileDiffusion
    return VersatileDiffusion.default()


def test_default_model_is_vd_mini(vd_mini):
    assert os.path.realpath(vd_mini.source) == os.path.realpath(SHIPPED)


@pytest.mark.slow
def test_shipped_model_reduced_gate(vd_mini):
    """32 held-out prompts/images per flow and 16 prompt-control bases, 25 DDIM steps
    (trailing: what 'auto' gives this zero-terminal-SNR v model), at the model's recommended
    guidance scale (3; about a minute). Each bound is far above chance and v2 and about four
    standard errors (n = 32) below the value measured for this release, so a regression in
    the weights, the sampler, the encoders or the reader fails it."""
    from vd_jax.eval.prompt_control import prompt_control
    from vd_jax.eval.shapes_eval import EvalSettings, evaluate
    assert vd_mini.sampling_defaults['scale'] == 3.0
    rec = evaluate(vd_mini, EvalSettings(n=32, steps=25, batch_size=32,
                                         flows=('t2i', 'i2t', 'i2i', 't2t')), None,
                   log=lambda s: None)
    assert rec['settings']['scale'] == 3.0
    got = {'t2i': rec['flows']['t2i']['accuracy'], 'i2t': rec['flows']['i2t']['accuracy'],
           'i2i': rec['flows']['i2i']['preserved'], 't2t': rec['flows']['t2t']['preserved']}
    # measured for this release (v3, 2026-12-06), n=32 here (n=200 in docs/vd-mini.md), all
    # five: t2i 0.97 (0.96), i2t 1.0 (0.97), i2i 0.97 (0.94), t2t 0.94 (0.975); every single
    # attribute >= 0.94. v2 (scale 7.5, n=200), all five: 0.045, 0.02, 0.04, 0.005
    for flow, acc in got.items():
        assert acc['all'] >= 0.78, (flow, acc)
        assert min(acc[f] for f in ('shape', 'colour', 'background', 'size', 'position')) \
            >= 0.8, (flow, acc)
    # the prompt decides background and position at a fixed seed (measured 1.0 and 1.0 at
    # n=16; chance 1/3 and 1/9; v2 drew the asked background at chance)
    control = prompt_control(vd_mini, 16, steps=25)
    assert control['follows']['background'] >= 0.85, control['follows']
    assert control['follows']['position'] >= 0.8, control['follows']


@pytest.mark.slow
def test_readme_main_job_draws_the_demo_prompt(tmp_path, capsys):
    """The README's first command, `python sample.py` (the shipped model, the demo prompt,
    4 samples, its defaults): every one of the 4 images shows what the prompt says, read
    back from the PNGs it writes (v2: 1 of 4)."""
    from PIL import Image
    from vd_jax import sample_cli
    from vd_jax.eval.shapes_reader import parse_caption, read_images
    assert sample_cli.main(['--out', str(tmp_path), '--no-compile-cache']) == 0
    assert "guidance scale 3: the model's recommendation" in capsys.readouterr().err
    run = tmp_path / 'run-001'
    files = sorted(p for p in os.listdir(run) if p[0].isdigit() and p.endswith('.png'))
    assert len(files) == 4, files
    images = np.stack([np.asarray(Image.open(run / f).convert('RGB'), np.float32) / 255
                       for f in files])
    asked = parse_caption(sample_cli.DEMO_PROMPT)
    assert [tuple(a) for a in read_images(images)] == [tuple(asked)] * 4


# The whole recipe on a reduced budget: a few hundred steps per stage.
REDUCED = ['data.num_records=2000', 'optimizer.warmup_steps=20', 'checkpoint.every=10000',
           'validation.every=0', 'log_every=100',
           'autokl.total_steps=80', 'autokl.batch_size=8', 'clip.total_steps=100',
           'optimus.total_steps=20', 'optimus.optimizer.warmup_steps=5',
           'basic.total_steps=80', 'dc.total_steps=200',
           'four_flow.total_steps=10', 'four_flow.optimizer.warmup_steps=2']
# (Optimus and four-flow only show the plumbing here: their gate numbers are recorded and
# four-flow starts from dc's export; the learning asserted below is dc's. At 60 steps each
# they took 5 of the test's 20 minutes.)


@pytest.mark.slow
def test_stage_pipeline_learns_from_nothing(tmp_path):
    from vd_jax.eval.shapes_eval import EvalSettings, evaluate
    from vd_jax.pipeline import VersatileDiffusion
    from vd_jax.train.stages import run_stages
    work = str(tmp_path / 'vd_mini')
    t0 = time.monotonic()
    # a reduced budget does not pass the stage-0 gates: go on, as --ignore-gates does
    record = run_stages(work, REDUCED, ignore_gates=True)
    # where the test's minutes go (`pytest -s`): each stage's seconds and its gate's
    print(f'stages took {time.monotonic() - t0:.0f} s:',
          {k: (r.get('seconds'), (r.get('gate') or {}).get('seconds')) for k, r in record.items()})
    assert list(record) == ['autokl', 'clip', 'optimus', 'basic', 'dc', 'four_flow']
    for stage, r in record.items():
        assert os.path.isdir(r['export']), stage
    # the VD stages read the world pre-encoded once by the stage-0 exports (the same batches
    # as the encoders in the loop: tests/test_stages_preencode.py)
    for stage in ('basic', 'dc', 'four_flow'):
        assert record[stage]['inputs']['kind'] == 'encoded', record[stage]
        with open(os.path.join(work, stage, 'config.json')) as f:
            assert json.load(f)['data']['kind'] == 'encoded'
    assert record['basic']['inputs']['path'] == record['four_flow']['inputs']['path']
    for stage in ('autokl', 'clip', 'optimus'):   # each stage-0 gate measured and recorded
        assert 'shape' in json.dumps(record[stage]['gate']['numbers']), record[stage]
    # each VD stage started from the previous stage's export and used the stage-0 encoders
    with open(os.path.join(work, 'four_flow', 'init_report.json')) as f:
        assert 'dc' in json.dumps(json.load(f))
    with open(os.path.join(record['four_flow']['export'], 'manifest.json')) as f:
        frozen = json.load(f)['frozen_parts_from']
    # (recorded relative to the stage's run folder: the manifest names no folder of this machine)
    from vd_jax.train.manifest_paths import resolved_from
    assert any(os.path.abspath(record['autokl']['export']) in
               resolved_from(v, os.path.join(work, 'four_flow')) for v in frozen.values()), frozen
    vd = VersatileDiffusion.from_checkpoint(os.path.join(work, 'final'))
    # at 7.5, as measured below (the recipe's exports recommend 3, which the reduced budget's
    # numbers were not measured at)
    assert vd.sampling_defaults['scale'] == 3.0
    t1 = time.monotonic()
    rec = evaluate(vd, EvalSettings(n=64, steps=20, scale=7.5, batch_size=64, flows=('t2i',)),
                   None, log=lambda s: None)
    print(f'evaluation took {time.monotonic() - t1:.0f} s')
    acc = rec['flows']['t2i']['accuracy']
    # what a few hundred steps learn first: with v3's objective (v-prediction, zero terminal
    # SNR; docs/vd-mini.md, the ablation from scratch) the background the prompt asks for.
    # Measured 0.73 and 0.83 on 64 held-out prompts at this budget (seeds 0 and 1, 2026-12-07,
    # 468-518 s alone on a 2-core Zen 4); 0.84 with autokl 120, clip 150, basic 120, dc 350
    # steps (637 s), 0.89 with 150, 200, 150, 400; 0.83 with 200, 250, 200, 500; chance is
    # 0.33 +- 0.06 (one standard error). v2's eps objective drew the asked background at
    # chance in the ablation (0.35 after 1000 steps from scratch), and the size first (0.67
    # here).
    assert acc['background'] >= 0.6, acc
    # the loss fell over the VD stages (the first logged dc step against the last)
    with open(os.path.join(work, 'dc', 'metrics.jsonl')) as f:
        losses = [json.loads(line)['loss'] for line in f]
    assert losses[-1] < 0.7 * losses[0], losses
    # and the release command writes the float16 copy that loads as the same model
    from vd_jax.train.stages import release
    out = release(work, str(tmp_path / 'released'))
    shipped = VersatileDiffusion.from_checkpoint(out)
    a = np.asarray(vd.text_to_image('a red circle', 1, steps=4, seed=0))
    b = np.asarray(shipped.text_to_image('a red circle', 1, steps=4, seed=0))
    assert np.abs(a - b).max() < 0.02  # measured 0.002: float16 rounding of the weights
