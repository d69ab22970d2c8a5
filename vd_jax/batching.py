"""Splitting sample indices over processes and into padded batches: the one helper for "pad
the last batch, continue the seeds, trim" (sample.py, the eval commands, the pipeline's mesh).

Sample i of a run always uses seed + i, whatever the batch or process it is made in, so the
indices can be cut up freely: `process_share` gives each process an even contiguous block,
`padded_batches` cuts a process's indices into calls (one seed range each) whose inputs are
padded by repeating the last one, so every call of a run has one shape (one compiled
program), and `Batch.trim` drops the outputs of the repeats. `map_batched` does all of it for
a list of inputs. `pad_rows` / `trim_rows` are the same for a pytree of batch-leading arrays
(a batch split over a mesh's data axes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Generic, List, Sequence, TypeVar

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


@dataclasses.dataclass(frozen=True)
class Batch(Generic[T]):
    """One call of a batched run.

    indices: the consecutive global sample indices it makes; inputs: their inputs, padded to
    the run's batch size with repeats of the last; seed: the seed of its first sample (sample
    i uses the run's seed + i, so the call's per-row seeds continue across batches)."""
    indices: List[int]
    inputs: List[T]
    seed: int

    def trim(self, outputs) -> list:
        """The call's outputs (batch-leading) without those of the padding."""
        return list(outputs)[:len(self.indices)]


def padded_batches(input_of: Callable[[int], T], indices: Sequence[int], size: int,
                   seed: int) -> List[Batch[T]]:
    """The calls that make the samples `indices` in batches of `size`: input_of(i) is the
    input of sample i, `seed` the run's seed (sample i: seed + i)."""
    return [Batch(chunk, pad_batch([input_of(i) for i in chunk], size), seed + chunk[0])
            for chunk in consecutive_batches(indices, size)]


def map_batched(fn: Callable[[List[T], int], Sequence], items: Sequence[T], batch_size: int,
                seed: int) -> list:
    """fn(inputs, seed) over `items` in padded batches of min(batch_size, len(items)); the
    outputs, one per item, in order (item i made with seed + i whatever the batching)."""
    size = batch_size_for(len(items), batch_size)
    out: list = []
    for b in padded_batches(items.__getitem__, range(len(items)), size, seed):
        out.extend(b.trim(fn(b.inputs, b.seed)))
    return out


def round_up(b: int, k: int) -> int:
    """The smallest multiple of k that is >= b (a batch split evenly over k shards)."""
    return -(-b // k) * k


def pad_rows(tree, b: int, to: int):
    """Batch-leading leaves (numpy or jax arrays) padded from b to `to` rows by repeating the
    last row (numpy stays numpy)."""
    if to == b:
        return tree
    # lazy: jax (+1.6 s)
    import jax  # noqa: PLC0415  # here, not at the top: sample.py imports this module before JAX loads
    import jax.numpy as jnp  # noqa: PLC0415
    # lazy: numpy (+0.1 s)
    import numpy as np  # noqa: PLC0415

    def pad(a):
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[-1:], to - b, axis=0)], axis=0)
    return jax.tree_util.tree_map(pad, tree)


def trim_rows(out, b: int):
    """The first b rows of batch-leading outputs: a list (sentences) or a pytree of arrays."""
    if isinstance(out, list):
        return out[:b]
    import jax  # noqa: PLC0415  # as pad_rows
    return jax.tree_util.tree_map(lambda x: x[:b], out)
