"""Multi-flow training of the VD diffuser on a device mesh (public API: the names below).

    from vd_jax.config import load_config
    from vd_jax import train
    cfg = load_config('train_tiny')
    train.train(cfg, '/tmp/vd_tiny')

  settings.py   flows, `apply_overrides`, the hashable `StepConfig` the jitted step is keyed on
  optim.py      AdamW/SGD + warm-up/decay schedules + clipping, per-group update multipliers, EMA
  step.py       `TrainState`, multi-flow loss and gradient accumulation, `train_step`, shardings
  inputs.py     data sources, host batch preparation, frozen encoders on device
  init_from.py  initialisation from a smaller VD setting / SD / SD-variation checkpoints
  loop.py       `train` (Orbax checkpoints, resume, metrics, divergence, preemption, export)
"""
from vd_jax.train.settings import (ConfigError, OptimConfig, StepConfig,  # noqa: F401
                                 apply_overrides, needed_fields, parse_flows)
from vd_jax.train.init_from import apply_init_sources, format_report, parse_map  # noqa: F401
from vd_jax.train.inputs import (FrozenEncoders, HostPrep, SyntheticLatentSource,  # noqa: F401
                                 make_encode_fn, record_spec)
from vd_jax.train.loop import (Checkpointer, Run, TrainingDiverged, export_ema,  # noqa: F401
                               export_from_workdir, frozen_encoders, gather, initial_state,
                               load_metrics, make_model, setup, train)
from vd_jax.train.optim import (group_of, groups_of, lr_schedule, make_optimizer,  # noqa: F401
                                multiplier_tree, scale_by_group)
from vd_jax.train.step import (TrainState, create_train_state, jit_train_step,  # noqa: F401
                               loss_and_grads, state_shardings, train_step)
