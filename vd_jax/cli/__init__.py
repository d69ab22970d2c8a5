"""The command-line layer shared by `sample.py`, `python -m vd_jax.eval`, the demo and
`python -m vd_jax.convert`.

  usage        usage errors (`vd_jax.errors.InputError`: a flag, input file or output folder
               that cannot be used: exit code 2 with one `error: ...` line, before any model
               loads), list files, output-folder checks, the persistent XLA compilation cache
  model_flags  --ckpt / --model / --config / --dtype, their checks, and `load_model`, the
               one place a command line turns those flags into a `VersatileDiffusion`
  sample_run   sample.py's task table and its runs (results as `SampleResult`)
  distributed  sample.py's several-process runs: the mesh, one shared run folder, the merge

This package imports nothing heavy at import time, so `--help` and usage errors answer before
JAX loads: modules that import JAX or Pillow are imported inside the functions that use them
(measured on a busy 2-core CPU host: `vd_jax.pipeline` ~7 s, `jax` ~5 s, `vd_jax.outputs` /
`vd_jax.image_io` ~0.35 s each, `vd_jax.platform` 0.13 s).
"""
