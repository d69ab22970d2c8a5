"""Splitting sample indices over processes and into padded batches (sample.py, eval).

Sample i of a run always uses seed + i, whatever the batch or process it is made in, so the
indices can be cut up freely: `process_share` gives each process an even contiguous block,
`consecutive_batches` cuts a process's indices into calls (one seed range each), and
`pad_batch` repeats the last input so every call of a run has one shape (one compiled
program; the outputs of the repeats are dropped by the caller).
"""
from __future__ import annotations

from typing import List, Sequence, TypeVar

T = TypeVar('T')


def process_share(total: int, index: int, count: int) -> range:
    """The contiguous block of the sample indices 0..total-1 that process `index` of `count`
    runs: the blocks cover every index once and their sizes differ by at most one."""
    if not 0 <= index < count:
        raise ValueError(f'process index {index} is not in [0, {count})')
    return range(index * total // count, (index + 1) * total // count)


def batch_size_for(total: int, batch_size: int, count: int = 1) -> int:
    """Rows per call when `total` samples are split over `count` processes: at most
    `batch_size`, and no more than the largest share (a process never computes a batch of
    padding that another process's share could have filled). One process: min(batch_size,
    total), the batch shape sample.py has always used."""
    return max(1, min(int(batch_size), -(-int(total) // int(count))))


def consecutive_batches(indices: Sequence[int], size: int) -> List[List[int]]:
    """Consecutive runs of `indices` cut into chunks of at most `size` (one seed range each)."""
    out: List[List[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1 and len(out[-1]) < size:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def pad_batch(xs: Sequence[T], size: int) -> List[T]:
    """`xs` followed by repeats of its last item up to `size` items."""
    xs = list(xs)
    return xs + [xs[-1]] * (size - len(xs))
