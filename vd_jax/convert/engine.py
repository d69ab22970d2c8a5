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
collected and raised together as a `CheckpointError` naming the keys.

Export runs the same tables backwards (`invert_rules` names the source key of every Flax
leaf, `build_plan` re-checks those keys forward, `run_export` applies the inverse
transforms), so whatever is exported converts back to the same parameters.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vd_jax.convert.transforms import Transform
from vd_jax.errors import CheckpointError


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
class ConversionPlan:
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
               tied: Optional[Mapping[str, str]] = None, where: str = '') -> ConversionPlan:
    """Match every source key, check coverage and shapes; raise `CheckpointError` on any gap.

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
        raise CheckpointError(f"cannot convert part '{part}'{' from ' + where if where else ''}:\n"
                              + '\n'.join(problems))
    return ConversionPlan(part, entries, ignored, tied_list)


def run_plan(plan: ConversionPlan, get: Callable[[str], np.ndarray], dtype=np.float32,
             ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (Flax path, array in `dtype`) one tensor at a time; verifies tied copies."""
    dtype = np.dtype(dtype)
    for key, other in plan.tied:
        a, b = get(key), get(other)
        if not np.array_equal(a, b):
            raise CheckpointError(f"'{key}' should be an exact copy of '{other}' but differs "
                                  f'(max abs diff {float(np.max(np.abs(a.astype(np.float64) - b))):.3g}); '
                                  'refusing to pick one silently')
    for e in plan.entries:
        a = e.transform.to_flax(get(e.source_key))
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(dtype, copy=False)
        yield e.path, np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------
# Export: the same tables read backwards
# --------------------------------------------------------------------------------------------

_BACKREF = re.compile(r'\\(\d+)')
_META = set('.^$*+?{}[]|')


def _template_regex(template: str):
    """A rule's Flax-path template as a regex whose named groups g<N> capture its \\N."""
    out, seen, pos = [], set(), 0
    for m in _BACKREF.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        g = int(m.group(1))
        out.append(f'(?P=g{g})' if g in seen else f'(?P<g{g}>[^/]+)')
        seen.add(g)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile(''.join(out))


def _fill(pattern: str, groups: Mapping[int, str]) -> Optional[str]:
    """The key a rule's pattern matches when its groups take `groups`; None if the pattern is
    more than escaped literals and plain (non-nested, capturing) groups."""
    out, i, g = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == '\\':
            if i + 1 == len(pattern) or pattern[i + 1].isalnum():
                return None  # a class (\d, \w) outside a group
            out.append(pattern[i + 1])
            i += 2
        elif c == '(':
            j = pattern.find(')', i)
            if j < 0 or '(' in pattern[i + 1:j] or pattern[i + 1:i + 2] == '?':
                return None
            g += 1
            if g not in groups:
                return None
            out.append(groups[g])
            i = j + 1
        elif c in _META:
            return None
        else:
            out.append(c)
            i += 1
    return ''.join(out)


def invert_rules(rules: Sequence[Rule], target_shapes: Mapping[str, Tuple[int, ...]],
                 part: str = '') -> Dict[str, Tuple[str, Rule]]:
    """The rule table read backwards: Flax path -> (canonical source key, rule), every path.

    An exact rule gives its key. A regex rule is inverted through its target template: the
    template's backreferences are read off the path and put in the pattern's groups, and the
    key is kept only if the rule maps it forward onto the same path. Exact rules are tried
    first, then the regex rules in order, as in `build_plan`, which re-checks every key
    forward when the export plan is built.
    """
    # exact tables list the source's keys in its own order: keep it
    out = {r.target: (r.pattern, r) for r in rules if r.exact and r.target in target_shapes}
    inverse = [(_template_regex(r.target), re.compile(r.pattern), r) for r in rules if not r.exact]
    missing = []
    for path in target_shapes:
        if path in out:
            continue
        for trx, rx, r in inverse:
            m = trx.fullmatch(path)
            if not m:
                continue
            key = _fill(r.pattern, {int(k[1:]): v for k, v in m.groupdict().items()})
            fm = rx.fullmatch(key) if key is not None else None
            if fm and fm.expand(r.target) == path:
                out[path] = (key, r)
                break
        else:
            missing.append(path)
    if missing:
        raise CheckpointError(f"cannot export part '{part}': no rule produces {len(missing)} "
                              f'parameter(s):\n' + _fmt(missing))
    return out


def run_export(plan: ConversionPlan, get: Callable[[str], np.ndarray], dtype=None,
               ) -> Iterator[Tuple[str, np.ndarray]]:
    """Inverse of `run_plan`: yield (source key, tensor in the source layout) one at a time.

    `get(path)` reads a Flax leaf; floating tensors are cast to `dtype` (None keeps theirs).
    Tied keys (e.g. a copy of a shared layer) follow as copies of the tensor they duplicate.
    """
    dtype = None if dtype is None else np.dtype(dtype)

    def torch_layout(e: Entry):
        a = e.transform.to_torch(np.asarray(get(e.path)))
        if dtype is not None and np.issubdtype(a.dtype, np.floating):
            a = a.astype(dtype, copy=False)
        return np.ascontiguousarray(a)

    by_key = {e.source_key: e for e in plan.entries}
    for e in plan.entries:
        yield e.source_key, torch_layout(e)
    for key, other in plan.tied:
        yield key, torch_layout(by_key[other])
