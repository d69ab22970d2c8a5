"""The noise schedule of a diffusers pipeline folder (`scheduler/scheduler_config.json`) as a
vd_jax `model.schedule` section (`vd_jax.diffusion.schedule.ScheduleConfig`).

diffusers' scheduler options -> vd_jax's:
  num_train_timesteps      timesteps
  beta_start / beta_end    beta_linear_start / beta_linear_end
  beta_schedule            beta_schedule ('linear' | 'scaled_linear' | 'squaredcos_cap_v2')
  rescale_betas_zero_snr   rescale_zero_terminal_snr
  prediction_type          prediction_type ('epsilon' | 'v_prediction' | 'sample')
A key the file leaves out takes diffusers' own default (the same in DDIMScheduler,
DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler and PNDMScheduler), since
that is what diffusers would run. The sampling options (`timestep_spacing`, `steps_offset`,
`set_alpha_to_one`, ...) are choices of a sampler, not of the model: they are not kept. The
way back is `vd_jax.export.diffusers_folder.scheduler_config`.
"""
from __future__ import annotations

import copy
import os
from typing import Mapping, Optional

from vd_jax.convert.sources import read_json_object
from vd_jax.errors import CheckpointError, ConfigError

SCHEDULER_CONFIG = os.path.join('scheduler', 'scheduler_config.json')
# diffusers' defaults of the scheduler classes above
DIFFUSERS_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                          beta_schedule='linear', rescale_betas_zero_snr=False,
                          prediction_type='epsilon', trained_betas=None)


def schedule_from_scheduler_config(cfg: Mapping, where: str = 'scheduler config') -> dict:
    """A diffusers scheduler config (the JSON object) -> a `model.schedule` section (dict).
    Raises CheckpointError naming `where` and the option vd_jax cannot express."""
    c = dict(DIFFUSERS_DEFAULTS, **cfg)
    if c['trained_betas'] is not None:
        raise CheckpointError(f'{where}: trained_betas (an explicit list of betas) is not a schedule '
                              "vd_jax builds; it knows beta_schedule 'linear', 'scaled_linear' and "
                              "'squaredcos_cap_v2'")
    # lazy: vd_jax.diffusion.schedule pulls in jax, flax (+0.6 s)
    from vd_jax.diffusion.schedule import ScheduleConfig  # noqa: PLC0415
    try:
        return ScheduleConfig.coerce(
            beta_linear_start=c['beta_start'], beta_linear_end=c['beta_end'],
            timesteps=c['num_train_timesteps'], beta_schedule=c['beta_schedule'],
            rescale_zero_terminal_snr=c['rescale_betas_zero_snr'],
            prediction_type=c['prediction_type']).to_dict()
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f'{where}: {e}') from None


def read_folder_schedule(folder: str) -> Optional[dict]:
    """The `model.schedule` of a diffusers pipeline folder, or None when it has no
    `scheduler/scheduler_config.json` (then VD's schedule stays)."""
    path = os.path.join(folder, SCHEDULER_CONFIG)
    if not os.path.isfile(path):
        return None
    cfg = read_json_object(path, 'scheduler config')
    return schedule_from_scheduler_config(cfg, f"'{path}'")


def with_folder_schedule(model_cfg, src):
    """`model_cfg` with its `schedule` replaced by the one of diffusers folder `src` (a copy;
    `model_cfg` itself unchanged), or `model_cfg` as it is when `src` is not a folder with a
    scheduler config."""
    if not (isinstance(src, str) and os.path.isdir(src)):
        return model_cfg
    schedule = read_folder_schedule(src)
    if schedule is None:
        return model_cfg
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg['schedule'] = schedule
    return model_cfg
