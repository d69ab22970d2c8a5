"""Multi-flow training of the VD diffuser on a device mesh.

  config.py     flows, `apply_overrides`, the hashable `StepConfig` the jitted step is keyed on
  optim.py      AdamW/SGD + warm-up/decay schedules + clipping, per-group update multipliers, EMA
  step.py       `TrainState`, multi-flow loss and gradient accumulation, `train_step`, shardings
  inputs.py     data sources, host batch preparation, frozen encoders on device
  init_from.py  initialisation from a smaller VD setting / SD / SD-variation checkpoints
  loop.py       `train_and_evaluate` (Orbax checkpoints, resume, metrics, divergence, export)

`vd_jax.trainer` re-exports the public names.
"""
