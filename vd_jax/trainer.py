"""Public API of vd_jax training (the implementation lives in `vd_jax.train`).

    from vd_jax.config import load_config
    from vd_jax import trainer
    cfg = load_config('train_tiny')
    trainer.train_and_evaluate(cfg, '/tmp/vd_tiny')

Pieces for custom loops and tests: `setup` (mesh, shardings, jitted step, loader),
`initial_state`, `train_step` / `jit_train_step`, `loss_and_grads`, `make_optimizer`,
`TrainState`, `StepConfig`, `export_ema` / `export_from_workdir`, `apply_overrides`.
"""
from vd_jax.train.config import (FLOWS, ConfigError, OptimConfig, StepConfig,  # noqa: F401
                                 apply_overrides, needed_fields, parse_flows)
from vd_jax.train.init_from import apply_init_sources, format_report, parse_map  # noqa: F401
from vd_jax.train.inputs import (Encoders, HostPrep, SyntheticLatentSource,  # noqa: F401
                                 make_encode_fn, record_spec)
from vd_jax.train.loop import (Checkpointer, Run, TrainingDiverged, export_ema,  # noqa: F401
                               export_from_workdir, gather, initial_state, load_metrics,
                               make_model, setup, train_and_evaluate)
from vd_jax.train.optim import (group_of, groups_of, lr_schedule, make_optimizer,  # noqa: F401
                                multiplier_tree, scale_by_group)
from vd_jax.train.step import (TrainState, create_train_state, jit_train_step,  # noqa: F401
                               loss_and_grads, state_shardings, train_step)
