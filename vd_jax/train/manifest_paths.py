"""Paths recorded in the manifests of exports and releases, relative to a run folder.

A manifest travels with its weights (`vd_jax/weights/vd_mini/manifest.json` ships in the
package), so it must not name the folders of the machine that built it. An export of a run
records the checkpoints its frozen parts came from relative to that run's folder (e.g.
`../autokl/export/step_1500` for a stage of `python -m vd_jax.train.stages`); a release
records every path relative to the stages' work folder (e.g. `autokl/export/step_1500`).
Values may be comma-separated lists, as `encoders.ckpt` is; items that are not paths
('random') stay as they are.
"""
from __future__ import annotations

import os

NOT_PATHS = ('', 'random')


def _is_path(item: str) -> bool:
    return item not in NOT_PATHS and (os.path.isabs(item) or os.path.exists(item))


def relative_to(value: str, root: str) -> str:
    """`value` (a path or comma-separated paths, absolute or relative to the current
    directory) with every path relative to `root`, '/'-separated."""
    root = os.path.abspath(root)
    return ','.join(os.path.relpath(os.path.abspath(i), root).replace(os.sep, '/')
                    if _is_path(i) else i for i in str(value).split(','))


def resolved_from(value: str, root: str) -> str:
    """The inverse of `relative_to`: relative items joined onto `root` (absolute ones kept)."""
    return ','.join(i if i in NOT_PATHS or os.path.isabs(i)
                    else os.path.normpath(os.path.join(os.path.abspath(root), i))
                    for i in str(value).split(','))


def absolute_paths(tree, where: str = '') -> list:
    """['key/path: value', ...] for every string in a JSON tree holding an absolute path
    (alone or as an item of a comma-separated list): what a manifest must not have."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in absolute_paths(v, f'{where}/{k}')]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in absolute_paths(v, f'{where}/{i}')]
    if isinstance(tree, str) and any(os.path.isabs(i) for i in tree.split(',')):
        return [f'{where}: {tree}']
    return []
