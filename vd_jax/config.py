"""Loading run configs: `configs/<name>.py` (or any file) whose `get_config(arg)` returns a
ConfigDict."""
from __future__ import annotations

import importlib
import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load 'name', 'name:arg', 'path/to/file.py' or 'path/to/file.py:arg'.

    A bare name is looked up in the `configs` package (`vd_four_flow`, `vd_dc`, `vd_basic`,
    `tiny`, ...).
    """
    path, _, arg = spec.partition(':')
    arg = arg or None
    if path.endswith('.py') or os.sep in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file '{path}' does not exist")
        mod_spec = importlib.util.spec_from_file_location(
            f'_vd_config_{abs(hash(os.path.abspath(path)))}', path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f'configs.{path}')
        except ModuleNotFoundError as e:
            if e.name not in (f'configs.{path}', 'configs'):
                raise
            raise ValueError(f"unknown config '{path}': no configs/{path}.py (give a name such "
                             "as 'vd_four_flow', or a path to a .py file)") from None
    if not hasattr(module, 'get_config'):
        raise ValueError(f"config '{spec}' has no get_config(arg) function")
    return module.get_config(arg)
