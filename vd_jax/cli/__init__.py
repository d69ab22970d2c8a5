"""The command-line layer shared by `sample.py`, `python -m vd_jax.eval`, the demo and
`python -m vd_jax.convert`.

  usage        `UsageError` (a flag, input file or output folder that cannot be used: exit
               code 2 with one `error: ...` line, before any model loads), list files,
               output-folder checks, the persistent XLA compilation cache
  model_flags  --ckpt / --model / --config / --dtype, their checks, and `load_model`, the
               one place a command line turns those flags into a `VersatileDiffusion`
  sample_run   sample.py's task table and its runs (results as `SampleResult`)
  distributed  sample.py's several-process runs: the mesh, one shared run folder, the merge

This package imports nothing heavy at import time: `--help` and usage errors answer before
JAX loads (importing `vd_jax.pipeline` takes ~7 s on a 2-core CPU host, `vd_jax.platform`
0.13 s).
"""
