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
  run.py        `setup`: mesh, model, jitted step, shardings, loader, frozen encoders; fresh state
  loop.py       `train`, top to bottom: restore or initialise, step, sync, checkpoint, export
  progress.py   the sync points: NaN check, validation, metrics, hooks, MFU, progress line + ETA
  checkpointer.py  Orbax checkpoints (state + EMA, data iterator, meta)
  metrics.py    metrics.jsonl / perf.jsonl / TensorBoard
  preemption.py SIGTERM / SIGINT -> save and stop (all processes at the same step)
  export.py     the EMA weights (+ frozen encoders) as a checkpoint folder sample.py loads
  objectives.py what is optimised: diffusion (every flow) or a stage-0 network (AutoKL, Optimus, CLIP)
  observe.py    FLOPs, MFU, input waits, profiler traces
  validation.py periodic held-out evaluation during a run
  stages.py     the VD-mini recipe: stage-0 networks, gates, diffusion stages, release
"""
from vd_jax.errors import ConfigError, TrainingDiverged  # noqa: F401
from vd_jax.train.settings import (StepConfig, apply_overrides, needed_fields,  # noqa: F401
                                   parse_flows)
from vd_jax.train.init_from import apply_init_sources, format_report, parse_map  # noqa: F401
from vd_jax.train.inputs import (FrozenEncoders, HostPrep, SyntheticLatentSource,  # noqa: F401
                                 make_encode_fn, record_spec)
from vd_jax.train.checkpointer import Checkpointer  # noqa: F401
from vd_jax.train.metrics import MetricWriter, load_metrics  # noqa: F401
from vd_jax.train.run import Run, frozen_encoders, initial_state, make_model, setup  # noqa: F401
from vd_jax.train.export import check_same_model, export_ema, export_from_workdir  # noqa: F401
from vd_jax.train.loop import train  # noqa: F401
from vd_jax.train.optim import (OptimConfig, group_of, groups_of, lr_schedule,  # noqa: F401
                                make_optimizer, multiplier_tree, scale_by_group)
from vd_jax.train.step import (TrainState, create_train_state, jit_train_step,  # noqa: F401
                               loss_and_grads, state_shardings, train_step)
from vd_jax.sharding import gather  # noqa: F401
