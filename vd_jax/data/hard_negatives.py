"""Hard-negative batches for the shapes world (`data.hard_negatives`, issue 19).

With random batches a record's neighbours (the records that differ from it in one attribute)
are rarely in its batch, so a contrastive loss never has to tell, say, two positions apart
among otherwise identical pairs. With `data.hard_negatives = k` (k >= 2, data.kind='shapes')
every batch is made of groups of k consecutive records: a base record, then k - 1 records
that each differ from the base in exactly one attribute.

Config (`cfg.data`):
  hard_negatives       k: 0 = off (the loader is exactly the plain one), else >= 2; the
                       per-process batch must be a multiple of k
  hard_negative_attrs  the attributes a member may change: comma-separated names of
                       `shapes.FIELDS` (default all five), e.g. 'position'

The sampler (`HardNegativeSampler`) replaces the loader's record choice; everything else
(Preprocess, batching, process shares, grain iterator state) is unchanged:
  * Readers. Process p of P reads global stream positions p, p+P, ...; with W grain workers
    (W = 0 counts as 1), worker w of process p reads the positions n with n % R == p + P*w,
    R = P * W, in increasing order, and batches them in that order. Reader ("lane")
    l = n % R, its j-th read is j = n // R.
  * Groups. Reads j = g*k ... g*k + k-1 of lane l form group G = g*R + l (member m = j % k).
    A per-process batch of B = multiple of k consecutive reads therefore holds B/k whole
    groups, and every group belongs to one process (and one worker).
  * Bases. Member 0 of group G is the record the plain shuffled sampler gives at position G
    (`IndexSampler(seed, shuffle)`): G runs over 0, 1, 2, ... exactly once across all lanes,
    so the bases of the processes are disjoint and each epoch of the plain stream is one
    pass of bases (one base epoch = k * num_records stream positions).
  * Members. Member m >= 1 changes attribute attrs[(s + m - 1 + t) % len(attrs)] (s drawn
    per group, t = 0 unless that attribute has no usable value, then the next attribute) to
    a random other value, such that the combination is a training combination present in the
    data (never held out: `shapes.is_heldout`) and new in the group; the record is drawn
    among the records of that combination. If no attribute gives one (tiny datasets, or k - 1
    beyond the neighbours available), the member is a uniformly random record. Members are
    free draws: they may also occur elsewhere in the batch or in another process's batch.
  * Start-up: every process reads all records' labels once (images not decoded; 1.6 s for
    the 20k records of VD-mini) into a `NeighbourTable`.
  * Everything is a pure function of (seed, stream position, the records' labels), so
    `get_state` / `set_state` resume onto the same batches; the sampler's repr (checked by
    grain on restore) names k, the attributes, R, the seed and a fingerprint of the labels.
"""
from __future__ import annotations

import copy
import sys
import zlib
from typing import Callable, Optional, Sequence, Tuple, Union

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources.base import BaseDataSource

from vd_jax.data import shapes as sw
from vd_jax.errors import ConfigError

ALL_ATTRS = ','.join(sw.FIELDS)
_DIMS = tuple(len(sw.VOCAB[f]) for f in sw.FIELDS)
_RNG_TAG = 19  # separates the groups' random stream from the shuffle's and the crops'


def parse_attrs(spec: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """`data.hard_negative_attrs` (comma-separated string or a sequence) -> field names."""
    names = spec.split(',') if isinstance(spec, str) else list(spec)
    names = tuple(str(n).strip() for n in names if str(n).strip())
    bad = [n for n in names if n not in sw.FIELDS]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(f'data.hard_negative_attrs={spec!r}: give distinct attribute names '
                          f'out of {list(sw.FIELDS)}' + (f' (unknown: {bad})' if bad else ''))
    return names


def check_config(data_cfg, batch_size: int) -> int:
    """k of `data.hard_negatives` (0 when off) after checking it against `data.kind`, the
    attribute list and this process's `batch_size` (ConfigError otherwise). Cheap: call it
    before building anything."""
    k = int(data_cfg.get('hard_negatives', 0) or 0)
    if k == 0:
        return 0
    if k < 2:
        raise ConfigError(f'data.hard_negatives={k}: give 0 (off) or a group size >= 2')
    if str(data_cfg.kind) != 'shapes':
        raise ConfigError(f"data.hard_negatives={k} needs data.kind='shapes' (the records' "
                          f"attribute labels), got data.kind={str(data_cfg.kind)!r}")
    if int(batch_size) % k:
        raise ConfigError(f'data.hard_negatives={k}: the per-process batch size {batch_size} '
                          f'(batch_size / processes) must be a multiple of {k}')
    parse_attrs(data_cfg.get('hard_negative_attrs', ALL_ATTRS))
    return k


def record_labels(source) -> np.ndarray:
    """int64 (N, 5): every record's attribute labels (`shapes.FIELDS` order). tfds sources
    are read without decoding the images."""
    n = len(source)
    if isinstance(source, BaseDataSource):
        fast = copy.copy(source)  # shares the open files
        fast.decoders = {'image': tfds.decode.SkipDecoding()}
        rows = []
        for start in range(0, n, 4096):
            rows += fast.__getitems__(list(range(start, min(n, start + 4096))))
    else:
        rows = [source[i] for i in range(n)]
    try:
        return np.array([[int(r[f]) for f in sw.FIELDS] for r in rows], np.int64).reshape(n, 5)
    except KeyError as e:
        raise ConfigError(f'data.hard_negatives needs records with the shapes world labels '
                          f'{list(sw.FIELDS)}; a record lacks {e}') from None


class NeighbourTable:
    """The records of each training combination, from the records' labels (N, 5)."""

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels, np.int64)
        self.combos = np.ravel_multi_index(tuple(self.labels.T), _DIMS)
        heldout = np.array([sw.is_heldout(a) for a in sw.ALL_COMBINATIONS])
        usable = ~heldout[self.combos]               # a train source has only usable records
        keys = np.nonzero(usable)[0]
        self._order = keys[np.argsort(self.combos[keys], kind='stable')]
        bounds = np.searchsorted(self.combos[self._order], np.arange(sw.NUM_COMBINATIONS + 1))
        self._start, self._stop = bounds[:-1], bounds[1:]
        self.fingerprint = f'{zlib.crc32(self.labels.tobytes()):08x}'

    def __len__(self) -> int:
        return len(self.labels)

    def records(self, combo: int) -> np.ndarray:
        """Record keys of a combination (empty when absent or held out)."""
        return self._order[self._start[combo]:self._stop[combo]]


class HardNegativeSampler:
    """A grain sampler of hard-negative groups over `base` (see the module docstring).

    Args:
      base: the plain global-stream sampler (unsharded, endless): member 0 of group G is
        base[G]'s record.
      table: `NeighbourTable` of the source's records.
      k: group size (>= 2).
      attrs: the attributes members change (`shapes.FIELDS` names).
      readers: R = processes x max(worker_count, 1).
      seed: the loader's seed (groups' draws and the records' rng, seed + position).
    """

    def __init__(self, base, table: NeighbourTable, k: int, attrs: Sequence[str], readers: int,
                 seed: int):
        if len(base) != sys.maxsize:
            raise ValueError('hard-negative batches repeat forever: build the loader with '
                             'num_epochs=None')
        if k < 2 or readers < 1:
            raise ValueError(f'need k >= 2 and readers >= 1, got {k} and {readers}')
        self.base, self.table, self.k, self.readers = base, table, int(k), int(readers)
        self.attrs = tuple(sw.FIELDS.index(a) for a in parse_attrs(attrs))
        self.seed = int(seed)
        self._last: Tuple[int, Tuple[int, ...]] = (-1, ())

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:  # grain compares it with the checkpoint's on restore
        names = ','.join(sw.FIELDS[a] for a in self.attrs)
        return (f'HardNegativeSampler(base={self.base!r}, k={self.k}, attrs={names}, '
                f'readers={self.readers}, seed={self.seed}, records={len(self.table)}, '
                f'labels={self.table.fingerprint})')

    def position(self, index: int) -> Tuple[int, int]:
        """(group G, member m) of global stream position `index`."""
        lane, j = index % self.readers, index // self.readers
        g, m = divmod(j, self.k)
        return g * self.readers + lane, m

    def __getitem__(self, index: int):
        if index < 0:
            raise IndexError(f'negative stream position {index}')
        group, member = self.position(index)
        key = self.group(group)[member]
        rng = np.random.Generator(np.random.Philox(key=self.seed + index))
        return grain.RecordMetadata(index=index, record_key=key, rng=rng)

    def group(self, group: int) -> Tuple[int, ...]:
        """The k record keys of group `group`: base first."""
        last = self._last  # grain reads with several threads: one read of the cache
        if last[0] != group:
            last = self._last = (group, self._draw(group))
        return last[1]

    def _draw(self, group: int) -> Tuple[int, ...]:
        base = int(self.base[group].record_key)
        rng = np.random.default_rng([self.seed, _RNG_TAG, group])
        labels = self.table.labels[base]
        used = {int(self.table.combos[base])}
        keys = [base]
        first = int(rng.integers(len(self.attrs)))
        for m in range(1, self.k):
            key = self._neighbour(labels, first + m - 1, used, rng)
            keys.append(int(rng.integers(len(self.table))) if key is None else key)
        return tuple(keys)

    def _neighbour(self, labels: np.ndarray, turn: int, used: set,
                   rng: np.random.Generator) -> Optional[int]:
        for t in range(len(self.attrs)):
            field = self.attrs[(turn + t) % len(self.attrs)]
            for value in rng.permutation(_DIMS[field]):
                if value == labels[field]:
                    continue
                changed = labels.copy()
                changed[field] = value
                combo = int(np.ravel_multi_index(tuple(changed), _DIMS))
                records = self.table.records(combo)
                if combo in used or not len(records):
                    continue
                used.add(combo)
                return int(records[rng.integers(len(records))])
        return None


def from_config(data_cfg, batch_size: int, source) -> Optional[Callable]:
    """The `regroup` argument of `vd_jax.data.make_loader` for `data_cfg` (None when
    data.hard_negatives is 0): checks the config, then reads the labels of `source`."""
    k = check_config(data_cfg, batch_size)
    if not k:
        return None
    table = NeighbourTable(record_labels(source))
    attrs = parse_attrs(data_cfg.get('hard_negative_attrs', ALL_ATTRS))

    def regroup(base, readers: int) -> HardNegativeSampler:
        return HardNegativeSampler(base, table, k, attrs, readers, int(data_cfg.seed))
    return regroup
