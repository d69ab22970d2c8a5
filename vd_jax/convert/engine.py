"""The strict conversion engine: a table of rules, checked in full before any data is read.

A part (the diffuser, a VAE, a CLIP tower...) converts through
  * `rename`: source key -> canonical key (identity for the v1.0 layout; legacy and
    diffusers layouts are renamed onto v1.0 names by walking the layer order);
  * `rules`: ordered `Rule(regex over the canonical key, Flax path template, transform)`,
    first full match wins;
  * `ignore`: `Ignore(regex, reason)` for keys that are deliberately not converted;
  * `tied`: source key -> the source key it must equal (e.g. a copy of a shared layer);
    checked for equality when the data is read, then skipped.
Strictness: every source key is matched or ignored or tied, every Flax leaf is filled
exactly once, every shape is checked against `jax.eval_shape(init)`. All violations are
collected and raised together as a `ConversionError` naming the keys.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vd_jax.convert.transforms import Transform


class ConversionError(ValueError):
    """The source does not map onto the model; the message names every offending key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str          # regex, full match on the canonical source key (or the key itself)
    target: str           # Flax path ('/'-joined), may use \1.. backreferences
    transform: Transform
    exact: bool = False   # pattern is a literal key (looked up, not matched)


@dataclasses.dataclass(frozen=True)
class Ignore:
    pattern: str
    reason: str


@dataclasses.dataclass
class Entry:
    source_key: str
    canonical_key: str
    path: str
    transform: Transform


@dataclasses.dataclass
class Plan:
    """What a part's conversion will do; built and validated without reading tensor data."""
    part: str
    entries: List[Entry]
    ignored: List[Tuple[str, str]]          # (source key, reason)
    tied: List[Tuple[str, str]]             # (source key, key it must equal)

    def summary(self) -> str:
        return (f'{self.part}: {len(self.entries)} tensors, {len(self.ignored)} ignored, '
                f'{len(self.tied)} tied copies')


def _fmt(items, n=20):
    items = list(items)
    s = '\n'.join(f'    {i}' for i in items[:n])
    return s + (f'\n    ... and {len(items) - n} more' if len(items) > n else '')


def build_plan(part: str, source_shapes: Mapping[str, Tuple[int, ...]],
               target_shapes: Mapping[str, Tuple[int, ...]], rules: Sequence[Rule],
               ignore: Sequence[Ignore] = (), rename: Optional[Mapping[str, str]] = None,
               tied: Optional[Mapping[str, str]] = None, where: str = '') -> Plan:
    """Match every source key, check coverage and shapes; raise `ConversionError` on any gap.

    Args:
      source_shapes: source key -> shape, for the keys this part claims.
      target_shapes: Flax path -> shape (from `jax.eval_shape(init)`).
      rename: source key -> canonical key (missing keys map to themselves).
      tied: source key -> source key whose tensor it duplicates.
      where: the source's name, for messages.
    """
    rename = rename or {}
    tied = dict(tied or {})
    exact = {r.pattern: r for r in rules if r.exact}
    compiled = [(re.compile(r.pattern), r) for r in rules if not r.exact]
    compiled_ignore = [(re.compile(i.pattern), i) for i in ignore]
    entries, ignored, tied_list = [], [], []
    unmatched, unknown, shape_errors = [], [], []
    filled: Dict[str, str] = {}
    doubles = []
    for key in source_shapes:
        if key in tied:
            tied_list.append((key, tied[key]))
            continue
        canon = rename.get(key, key)
        rule = exact.get(canon)
        path = rule.target if rule is not None else None
        if rule is None:
            for rx, r in compiled:
                m = rx.fullmatch(canon)
                if m:
                    rule, path = r, m.expand(r.target)
                    break
        if rule is None:
            reason = next((i.reason for rx, i in compiled_ignore if rx.fullmatch(canon)), None)
            if reason is None:
                unmatched.append(key if canon == key else f'{key}  (as {canon})')
            else:
                ignored.append((key, reason))
            continue
        if path not in target_shapes:
            unknown.append(f'{key} -> {path}')
            continue
        if path in filled:
            doubles.append(f'{path} <- {filled[path]} and {key}')
            continue
        filled[path] = key
        want = tuple(rule.transform.source_shape(tuple(target_shapes[path])))
        got = tuple(source_shapes[key])
        if want != got:
            shape_errors.append(f'{key}: shape {got}, expected {want} for {path} '
                                f'({rule.transform.name})')
        entries.append(Entry(key, canon, path, rule.transform))
    for key, other in tied_list:
        if other not in source_shapes:
            unmatched.append(f'{key}  (copy of {other}, which is absent)')
        elif tuple(source_shapes[key]) != tuple(source_shapes[other]):
            shape_errors.append(f'{key}: shape {tuple(source_shapes[key])} differs from the '
                                f'{tuple(source_shapes[other])} of {other}, which it must copy')
    missing = sorted(set(target_shapes) - set(filled))
    problems = []
    if unmatched:
        problems.append(f'  {len(unmatched)} unexpected source key(s) (no rule, not ignored):\n'
                        + _fmt(unmatched))
    if unknown:
        problems.append(f'  {len(unknown)} key(s) map to a path the model does not have:\n'
                        + _fmt(unknown))
    if doubles:
        problems.append(f'  {len(doubles)} parameter(s) filled twice:\n' + _fmt(doubles))
    if shape_errors:
        problems.append(f'  {len(shape_errors)} shape mismatch(es):\n' + _fmt(shape_errors))
    if missing:
        problems.append(f'  {len(missing)} model parameter(s) missing from the source:\n'
                        + _fmt(missing))
    if problems:
        raise ConversionError(f"cannot convert part '{part}'{' from ' + where if where else ''}:\n"
                              + '\n'.join(problems))
    return Plan(part, entries, ignored, tied_list)


def run_plan(plan: Plan, get: Callable[[str], np.ndarray], dtype=np.float32,
             ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (Flax path, array in `dtype`) one tensor at a time; verifies tied copies."""
    dtype = np.dtype(dtype)
    for key, other in plan.tied:
        a, b = get(key), get(other)
        if not np.array_equal(a, b):
            raise ConversionError(f"'{key}' should be an exact copy of '{other}' but differs "
                                  f'(max abs diff {float(np.max(np.abs(a.astype(np.float64) - b))):.3g}); '
                                  'refusing to pick one silently')
    for e in plan.entries:
        a = e.transform.to_flax(get(e.source_key))
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(dtype, copy=False)
        yield e.path, np.ascontiguousarray(a)


def export_flat(plan: Plan, params_flat: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Inverse of `run_plan`: Flax leaves back to the source keys (round-trip tests, exports)."""
    out = {e.source_key: e.transform.to_torch(np.asarray(params_flat[e.path])) for e in plan.entries}
    for key, other in plan.tied:
        out[key] = out[other]
    return out
