"""The schedule travels with a diffusers folder: the export writes it into
`scheduler/scheduler_config.json` (beta_schedule, betas, rescale_betas_zero_snr,
prediction_type, timestep_spacing), converting the folder reads it back into the
checkpoint config's `schedule`, and diffusers' own DDIMScheduler built from that file has
vd_jax's alphas_cumprod (to 1e-6 absolute: diffusers computes in float32, vd_jax in float64
rounded to float32).
"""
import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

from vd_jax.checkpoint import read_config, write_checkpoint
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint
from vd_jax.convert.diffusers_scheduler import schedule_from_scheduler_config
from vd_jax.diffusion.schedule import ScheduleConfig, make_schedule
from vd_jax.errors import CheckpointError
from vd_jax.export import export_checkpoint
from vd_jax.export.diffusers_folder import scheduler_config, write_json
from vd_jax.pipeline import VersatileDiffusion

SCHEDULES = {
    'vd': {},
    'v zero-snr linear': dict(beta_schedule='linear', beta_linear_start=0.0001,
                              beta_linear_end=0.02, rescale_zero_terminal_snr=True,
                              prediction_type='v_prediction'),
    'cosine x0': dict(beta_schedule='squaredcos_cap_v2', prediction_type='sample'),
}


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_diffusers_scheduler_from_the_exported_config_has_our_schedule(name, tmp_path):
    from diffusers import DDIMScheduler
    sc = ScheduleConfig.coerce(SCHEDULES[name])
    write_json(str(tmp_path / 'scheduler' / 'scheduler_config.json'), scheduler_config(sc.to_dict()))
    sched = DDIMScheduler.from_pretrained(str(tmp_path / 'scheduler'))
    ours = make_schedule(sc)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.asarray(ours.alphas_cumprod),
                               rtol=0, atol=1e-6)
    assert sched.config.prediction_type == sc.prediction_type
    assert sched.config.rescale_betas_zero_snr == sc.rescale_zero_terminal_snr
    # zero terminal SNR: the grid that starts at pure noise (diffusers' 'trailing' = ours)
    assert sched.config.timestep_spacing == ('trailing' if sc.rescale_zero_terminal_snr else 'leading')
    if sc.rescale_zero_terminal_snr:
        assert float(sched.alphas_cumprod[-1]) == 0.0 == float(ours.alphas_cumprod[-1])
        sched.set_timesteps(10)
        from vd_jax.diffusion.sampling import trailing_timesteps
        np.testing.assert_array_equal(sched.timesteps.numpy(), trailing_timesteps(10)[::-1])
    # and read back: the same schedule section
    back = schedule_from_scheduler_config(json.loads(
        (tmp_path / 'scheduler' / 'scheduler_config.json').read_text()))
    assert back == sc.to_dict()


def test_scheduler_configs_vd_cannot_express_are_refused():
    # a DDIM config as diffusers' VD folder has it (no prediction_type: diffusers' epsilon)
    released = dict(_class_name='DDIMScheduler', beta_end=0.012, beta_schedule='scaled_linear',
                    beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
                    set_alpha_to_one=False, steps_offset=1, trained_betas=None)
    assert schedule_from_scheduler_config(released) == ScheduleConfig().to_dict()
    # keys left out take diffusers' defaults (linear betas 1e-4 .. 0.02), as diffusers runs it
    assert schedule_from_scheduler_config({}) == ScheduleConfig(
        beta_linear_start=0.0001, beta_linear_end=0.02, beta_schedule='linear').to_dict()
    with pytest.raises(CheckpointError, match="here: schedule.beta_schedule must be one of .*'sigmoid'"):
        schedule_from_scheduler_config(dict(beta_schedule='sigmoid'), 'here')
    with pytest.raises(CheckpointError, match='trained_betas'):
        schedule_from_scheduler_config(dict(trained_betas=[0.1, 0.2]))
    with pytest.raises(CheckpointError, match='prediction_type must be one of'):
        schedule_from_scheduler_config(dict(prediction_type='flow'))


@pytest.mark.slow
def test_export_and_convert_keep_the_schedule(tmp_path):
    from diffusers import DDIMScheduler
    cfg = copy.deepcopy(load_config('tiny').model)
    vd = VersatileDiffusion.random(cfg, seed=2)
    trained = copy.deepcopy(cfg)
    trained.schedule = ScheduleConfig.coerce(SCHEDULES['v zero-snr linear']).to_dict()
    ck = str(tmp_path / 'ck')
    write_checkpoint(ck, trained, {'diffuser': jax.tree.map(np.asarray, vd.params['diffuser'])})
    folder = str(tmp_path / 'diffusers')
    export_checkpoint(ck, folder, 'diffusers')
    written = json.load(open(os.path.join(folder, 'scheduler', 'scheduler_config.json')))
    assert (written['prediction_type'], written['rescale_betas_zero_snr'],
            written['timestep_spacing'], written['beta_schedule']) == \
        ('v_prediction', True, 'trailing', 'linear')
    assert (written['beta_start'], written['beta_end'], written['num_train_timesteps'],
            written['steps_offset'], written['set_alpha_to_one']) == (0.0001, 0.02, 1000, 1, False)
    np.testing.assert_allclose(
        DDIMScheduler.from_pretrained(os.path.join(folder, 'scheduler')).alphas_cumprod.numpy(),
        np.asarray(make_schedule(trained.schedule).alphas_cumprod), rtol=0, atol=1e-6)
    # converted with a config of VD's schedule: the folder's schedule wins
    back = convert_checkpoint(folder, cfg, str(tmp_path / 'back'))
    assert ScheduleConfig.coerce(read_config(back)['schedule']) == \
        ScheduleConfig.coerce(trained.schedule)
    assert cfg.schedule.to_dict() == load_config('tiny').model.schedule.to_dict()  # not mutated
    # a folder without a scheduler config keeps the given config's (VD's) schedule
    shutil.rmtree(os.path.join(folder, 'scheduler'))
    plain = convert_checkpoint(folder, cfg, str(tmp_path / 'plain'))
    assert ScheduleConfig.coerce(read_config(plain)['schedule']) == ScheduleConfig()
