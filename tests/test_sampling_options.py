"""The pipeline reads the checkpoint's schedule (`model.schedule`: betas, zero terminal SNR,
prediction type) and passes the sampling options (sampler, spacing, Karras grid, guidance
rescale) through to the sampler.

Reference: `vd_jax.diffusion.sampling.sample` (the pure one-call API) on the same tiny random
diffuser, contexts and seeds, jitted on its own. Both run the same float32 arithmetic, so the
decoded images agree to 1e-5 (summation-order noise); a mis-read option (e.g. the wrong
prediction type) changes the latents by O(0.1-1), which the second comparison checks.
"""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.config import load_config
from vd_jax.diffusion.sampling import sample
from vd_jax.diffusion.schedule import make_schedule
from vd_jax.errors import InputError
from vd_jax.pipeline import VersatileDiffusion
from vd_jax.tasks.common import SamplingOptions

STEPS = 4
PROMPT = 'a red circle'


def _tiny(**schedule):
    cfg = copy.deepcopy(load_config('tiny').model)
    for k, v in schedule.items():
        cfg.schedule[k] = v
    return VersatileDiffusion.random(cfg, seed=1)


@pytest.fixture(scope='module')
def v_zero_snr():
    """A model as one trains it for zero terminal SNR: v-prediction on linear betas."""
    return _tiny(prediction_type='v_prediction', rescale_zero_terminal_snr=True,
                 beta_schedule='linear')


@pytest.fixture(scope='module')
def v_vd_schedule():
    """v-prediction on VD's own schedule."""
    return _tiny(prediction_type='v_prediction')


def _reference(vd, schedule, *, seed, n, **options):
    """Text->image latents by `sampling.sample` with the pipeline's contexts and seeds."""
    comps = vd.components
    c = comps.encode_context('text', [PROMPT] * n)
    u = comps.uncond_context('text', 'image', 'v1.0', c)
    d = comps.module('diffuser')
    shape = comps.latent_shape('image', n, (vd.image_size, vd.image_size))
    keys = jnp.asarray(seed + np.arange(n), jnp.uint32)

    @jax.jit
    def run(p, c, u):
        return sample(lambda x, t, ctx: d.apply({'params': p}, x, t, ctx, 'image', 'text'),
                      schedule, c, uncond_context=u, keys=keys, shape=shape, steps=STEPS,
                      **options)
    return comps.decode_latent('image', run(vd.params['diffuser'], c, u))


CASES = {
    # zero terminal SNR needs the trailing grid (its first step is t = T - 1, pure noise);
    # guidance rescale is what Lin et al. pair with it
    'ddim trailing rescale': ('v_zero_snr', 'sample',
                              dict(sampler='ddim', spacing='trailing', guidance_rescale=0.7)),
    'dpm++ karras': ('v_vd_schedule', 'epsilon', dict(sampler='dpm++', karras=True)),
    'euler_a': ('v_vd_schedule', 'epsilon', dict(sampler='euler_a')),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_pipeline_samples_with_the_checkpoint_schedule(case, request):
    model, wrong, options = CASES[case]
    vd = request.getfixturevalue(model)
    got = vd.text_to_image(PROMPT, n=2, steps=STEPS, seed=5, **options)
    schedule = make_schedule(vd.config['schedule'])
    assert schedule.prediction_type == 'v_prediction'
    np.testing.assert_allclose(got, _reference(vd, schedule, seed=5, n=2, **options), atol=1e-5)
    # the config is really read: another prediction type gives another result
    other = make_schedule(vd.config['schedule'], prediction_type=wrong)
    assert np.abs(got - _reference(vd, other, seed=5, n=2, **options)).max() > 1e-2
    if options.get('guidance_rescale'):  # and the rescale reaches the sampler
        plain = dict(options, guidance_rescale=0.0)
        assert np.abs(got - _reference(vd, schedule, seed=5, n=2, **plain)).max() > 1e-3


def test_options_are_refused_with_a_message_naming_them():
    with pytest.raises(InputError, match=r'guidance_rescale must be in \[0, 1\].*got -0.1'):
        SamplingOptions(guidance_rescale=-0.1)
    with pytest.raises(InputError, match='guidance_rescale must be in'):
        SamplingOptions(guidance_rescale=1.5)
    with pytest.raises(InputError, match=r"karras .* is for the samplers \('dpm\+\+',\), not 'ddim'"):
        SamplingOptions(sampler='ddim', karras=True)
    with pytest.raises(InputError, match="sampler must be one of .*'euler_a'"):
        SamplingOptions(sampler='heun')
    SamplingOptions(sampler='dpm++', karras=True, guidance_rescale=0.7)
    for name in ('euler', 'euler_a'):
        SamplingOptions(sampler=name)


@pytest.mark.slow
def test_the_pipeline_refuses_before_sampling(v_zero_snr):
    vd = v_zero_snr
    with pytest.raises(InputError, match='karras'):
        vd.text_to_image(PROMPT, steps=STEPS, sampler='euler', karras=True)
    # an epsilon model cannot denoise the zero-SNR step the trailing grid starts at
    eps = _tiny(rescale_zero_terminal_snr=True)
    with pytest.raises(InputError, match='epsilon-prediction model cannot denoise t=999'):
        eps.text_to_image(PROMPT, steps=STEPS, spacing='trailing')


@pytest.mark.slow
def test_sample_py_runs_a_v_model_and_records_the_schedule(v_zero_snr, tmp_path, capsys):
    import json
    from vd_jax import sample_cli
    from vd_jax.checkpoint import write_checkpoint
    ck = str(tmp_path / 'ck')
    write_checkpoint(ck, v_zero_snr.config, {p: jax.tree.map(np.asarray, v_zero_snr.params[p])
                                             for p in ('diffuser', 'vae_image', 'ctx_text')})
    out = tmp_path / 'out'
    argv = ['--ckpt', ck, '--prompt', PROMPT, '--n', '1', '--steps', '2', '--spacing', 'trailing',
            '--guidance-rescale', '0.7', '--out', str(out), '--no-compile-cache']
    assert sample_cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    settings = json.loads((out / 'run-001' / 'settings.json').read_text())
    assert (settings['sampler'], settings['spacing'], settings['guidance_rescale'],
            settings['karras']) == ('ddim', 'trailing', 0.7, False)
    assert settings['schedule']['prediction_type'] == 'v_prediction'
    assert settings['schedule']['rescale_zero_terminal_snr'] is True
    # the default 'auto' at 3 steps (the original grid lacks them: an eps model gets a note
    # that 'leading' is used): for this model 'auto' is 'trailing', said nowhere as 'leading',
    # and recorded as the grid used
    capsys.readouterr()
    argv = ['--ckpt', ck, '--prompt', PROMPT, '--n', '1', '--steps', '3', '--out', str(out),
            '--no-compile-cache']
    assert sample_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert 'leading' not in err and 'note:' not in err, err
    settings = json.loads((out / 'run-002' / 'settings.json').read_text())
    assert (settings['spacing'], settings['spacing_used']) == ('auto', 'trailing')


@pytest.mark.slow
def test_demo_controls_reach_the_pipeline(v_vd_schedule):
    """The demo's sampler select (with the new samplers), step grid, Karras checkbox and
    guidance-rescale slider: the page's result equals the Python API with those options."""
    import os
    from streamlit.testing.v1 import AppTest
    from vd_jax.demo import model, options
    vd = v_vd_schedule
    model.set_served(model.Served(vd, untrained=True))
    options.set_current(options.parse([]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        at = AppTest.from_file(os.path.join(root, 'vd_jax', 'demo', 'app.py'), default_timeout=600)
        at.run()
        assert 'euler_a' in at.selectbox(key='t2i_sampler').options
        at.text_area(key='t2i_prompt').set_value(PROMPT)
        at.number_input(key='t2i_steps').set_value(STEPS)
        at.number_input(key='t2i_n').set_value(1)
        at.selectbox(key='t2i_sampler').set_value('dpm++')
        at.selectbox(key='t2i_spacing').set_value('trailing')
        at.checkbox(key='t2i_karras').check()
        at.slider(key='t2i_guidance_rescale').set_value(0.5)
        at.button(key='t2i_run').click()
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        res = at.session_state['t2i_result']
    finally:
        model.set_served(None)
        options.set_current(None)
    s = res.settings
    assert (s['sampler'], s['spacing'], s['karras'], s['guidance_rescale']) == \
        ('dpm++', 'trailing', True, 0.5)
    want = vd.text_to_image([PROMPT], 1, steps=STEPS, seed=s['seed'], sampler='dpm++',
                            spacing='trailing', karras=True, guidance_rescale=0.5)
    np.testing.assert_array_equal(res.images, want)


def test_eval_runs_recorded_before_these_options_still_resume():
    from vd_jax.eval.generate import GenerationSpec
    spec = GenerationSpec('tiny', 't2i', 'ddim', 2, 7.5, 0.0, 0, None, None, 'float32', 3, 'abc')
    old = {k: v for k, v in spec.to_dict().items()
           if k not in ('spacing', 'karras', 'guidance_rescale')}
    assert spec.mismatch(old) == []
    karras = GenerationSpec(**dict(spec.to_dict(), sampler='dpm++', karras=True))
    assert sorted(m.split(':')[0] for m in karras.mismatch(old)) == ['karras', 'sampler']


# ------------------------------------------------------------------------------------------
# The guidance scale a model's config recommends (`sampling.scale`, e.g. VD-mini v3's 3)
# ------------------------------------------------------------------------------------------

def test_a_model_config_recommends_only_a_valid_scale():
    from vd_jax.errors import CheckpointError
    cfg = load_config('tiny').model
    assert 'sampling' not in cfg and SamplingOptions.model_defaults(cfg) == {}
    cfg = copy.deepcopy(cfg)
    cfg.sampling = {'scale': 3.0}
    assert SamplingOptions.model_defaults(cfg) == {'scale': 3.0}
    cfg.sampling = {'scale': 3.0, 'steps': 10}
    with pytest.raises(CheckpointError, match=r"'sampling' has \['steps'\].*only \['scale'\]"):
        SamplingOptions.model_defaults(cfg)
    cfg.sampling = {'scale': -1.0}
    with pytest.raises(CheckpointError, match=r"'sampling': scale \(guidance\) must be >= 0"):
        SamplingOptions.model_defaults(cfg)


@pytest.fixture(scope='module')
def recommends_scale_1():
    """A tiny model whose config recommends guidance scale 1 (conditional only)."""
    vd = _tiny()
    cfg = copy.deepcopy(vd.config)
    cfg.sampling = {'scale': 1.0}
    return VersatileDiffusion(cfg, dict(vd.params), source='recommends scale 1')


@pytest.mark.slow
def test_the_models_recommended_scale_is_the_default(recommends_scale_1):
    vd = recommends_scale_1
    assert vd.sampling_defaults['scale'] == 1.0
    assert _tiny().sampling_defaults['scale'] == 7.5   # no recommendation: VD's
    run = lambda **kw: vd.text_to_image(PROMPT, 1, steps=2, seed=0, **kw)  # noqa: E731
    default = run()
    np.testing.assert_array_equal(default, run(scale=1.0))
    assert np.abs(default - run(scale=7.5)).max() > 1e-3   # a caller's scale wins


@pytest.mark.slow
def test_command_lines_take_the_models_recommended_scale(recommends_scale_1, tmp_path, capsys):
    """sample.py and the evaluation read the recommendation from the config before loading;
    --scale wins; a config that recommends what it cannot is refused before any work."""
    import json
    from vd_jax import sample_cli
    from vd_jax.checkpoint import write_checkpoint
    from vd_jax.eval import checks
    from vd_jax.eval.__main__ import build_parser
    vd = recommends_scale_1
    ck = str(tmp_path / 'ck')
    write_checkpoint(ck, vd.config, {p: jax.tree.map(np.asarray, vd.params[p])
                                     for p in ('diffuser', 'vae_image', 'ctx_text')})
    out = tmp_path / 'out'
    base = ['--ckpt', ck, '--prompt', PROMPT, '--n', '1', '--steps', '2', '--out', str(out),
            '--no-compile-cache']
    assert sample_cli.main(base) == 0
    assert "guidance scale 1: the model's recommendation" in capsys.readouterr().err
    assert sample_cli.main(base + ['--scale', '2']) == 0
    assert 'recommendation' not in capsys.readouterr().err
    scales = [json.loads((out / f'run-00{i}' / 'settings.json').read_text())['scale']
              for i in (1, 2)]
    assert scales == [1.0, 2.0]
    parser = build_parser()   # the evaluation's checks, which run before any model loads
    for flags, want in (([], 1.0), (['--scale', '4'], 4.0), (['--model', 'tiny'], 7.5)):
        model = flags if flags[:1] == ['--model'] else ['--ckpt', ck] + flags
        argv = ['shapes', '--out', str(tmp_path / 'evals')] + model
        args, _ = checks.check(parser.parse_args(argv), parser, argv)
        assert args.scale == want, (flags, args.scale)
    # a broken recommendation: refused before loading, naming the key
    with open(os.path.join(ck, 'config.json')) as f:
        cfg = json.load(f)
    cfg['sampling'] = {'steps': 3}
    with open(os.path.join(ck, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    assert sample_cli.main(base) == 2
    assert "'sampling' has ['steps']" in capsys.readouterr().err
