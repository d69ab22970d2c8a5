"""Run configs: Python files whose `get_config(arg=None)` returns an ml_collections.ConfigDict.

Load one with `vd_jax.config.load_config('vd_four_flow')`, `'vd_four_flow:tiny'` or a file
path `'path/to/my_config.py:arg'`.
"""
