"""The grain training loader: global shuffle, per-process shares, resize + random crop, batches.

One `grain.DataLoader` per JAX process. The sampler shuffles the *global* record stream (a new
permutation every epoch, O(1) memory), and process p of P reads stream positions p, p+P, p+2P,
..., so the processes' shares are disjoint and together cover each epoch. Every record carries a
NumPy Generator seeded by `seed + stream position` (grain's IndexSampler), so crops depend only on
(seed, position): not on worker count, not on restarts. `iter(loader).get_state()` /
`set_state()` (or `grain.checkpoint.CheckpointSave/Restore` in an Orbax manager) therefore
resume a run onto exactly the batches an uninterrupted run would have seen.

The original LAION loader (legacy `ds_laion2b_webdataset.py`) does Resize(scale, bicubic) ->
RandomCrop(scale) -> ToTensor -> x*2-1 on PIL images; `resize_and_crop` does the same with PIL's
bicubic filter, which is antialiased when shrinking.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from vd_jax.data.builder import open_dataset

SizeLike = Union[Tuple[int, int], Sequence[Tuple[int, int]]]


def resize_and_crop(image: np.ndarray, size: int,
                    rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic, antialiased) and crop `size` x `size`.

    Args:
      image: uint8 (H, W, 3).
      size: output side.
      rng: random crop offsets from it; None for a centre crop.
    Returns:
      uint8 (size, size, 3).
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'expected an (H, W, 3) image, got shape {image.shape}')
    h, w = image.shape[:2]
    # torchvision's Resize(int): the short side becomes `size`, the long side int(size*long/short)
    if h <= w:
        nh, nw = size, max(size, int(size * w / h))
    else:
        nh, nw = max(size, int(size * h / w)), size
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    if rng is None:
        top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    else:
        top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return image[top:top + size, left:left + size]


class Preprocess(grain.transforms.RandomMap):
    """Per-record transform: text fields bytes -> str; 'image' -> (size, size, 3).

    The image becomes float32 in [-1, 1] (x*2-1 of x in [0, 1], as the original loader) when
    `scale`, else stays uint8 (4x less host->device traffic; scale on device). Records without
    'image' (pre-encoded latents) pass through with only the text conversion.
    """

    def __init__(self, image_size: Optional[int] = None, random_crop: bool = True,
                 scale: bool = True):
        self.image_size = image_size
        self.random_crop = random_crop
        self.scale = scale

    def random_map(self, element: Mapping[str, Any], rng: Optional[np.random.Generator]):
        out: Dict[str, Any] = {k: v.decode('utf-8', 'replace') if isinstance(v, bytes) else v
                               for k, v in element.items()}
        if 'image' in out and self.image_size:
            try:
                image = resize_and_crop(np.asarray(out['image'], dtype=np.uint8),
                                        self.image_size, rng if self.random_crop else None)
            except ValueError as e:
                raise ValueError(f"record {out.get('id', '?')!r}: {e}") from None
            if self.scale:
                image = image.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
            out['image'] = image
        return out

    def __repr__(self):
        return (f'Preprocess(image_size={self.image_size}, random_crop={self.random_crop}, '
                f'scale={self.scale})')


class SyntheticImageSource:
    """Deterministic random image-caption records for tests and smoke runs.

    Record i: image uint8 (H, W, 3) (sizes cycle through `size` if it is a list), caption str,
    id 'synthetic/<i:08d>'; identical for equal (seed, i), in any process. The repr is stable
    (grain checks it when restoring an iterator state).
    """
    WORDS = ('a', 'photo', 'of', 'red', 'blue', 'cat', 'dog', 'house', 'on', 'the', 'beach',
             'painting', 'mountain', 'small', 'large', 'tree', 'city', 'at', 'night', 'river')

    def __init__(self, num_records: int, size: SizeLike = (64, 64), *, seed: int = 0):
        if num_records <= 0:
            raise ValueError(f'num_records must be positive, got {num_records}')
        sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
        if not sizes or any(len(s) != 2 or min(s) <= 0 for s in sizes):
            raise ValueError(f'size must be (H, W) or a list of (H, W), got {size!r}')
        self.num_records = num_records
        self.sizes = sizes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f'record {index} out of range [0, {self.num_records})')
        rng = np.random.default_rng((self.seed, index))
        h, w = self.sizes[index % len(self.sizes)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        words = rng.choice(self.WORDS, size=int(rng.integers(3, 9)))
        return {'image': image, 'caption': ' '.join(words) + f' {index}',
                'id': f'synthetic/{index:08d}'}

    def __repr__(self) -> str:
        return f'SyntheticImageSource(num_records={self.num_records}, sizes={self.sizes}, seed={self.seed})'


def as_source(obj, split: str = 'train'):
    """A random-access source from: a source (len/getitem), a tfds builder, the dict of
    `builder.as_data_source()`, or the path of a prepared dataset folder."""
    if isinstance(obj, (str, os.PathLike)):
        return open_dataset(os.fspath(obj), split)
    if isinstance(obj, tfds.core.DatasetBuilder):
        return obj.as_data_source(split=split)
    if isinstance(obj, Mapping):
        if split not in obj:
            raise KeyError(f"split '{split}' not in the data sources {sorted(obj)}")
        return obj[split]
    if hasattr(obj, '__getitem__') and hasattr(obj, '__len__'):
        return obj
    raise TypeError(f'cannot read records from {type(obj).__name__}: give a random-access '
                    'source, a tfds builder or a prepared dataset path')


def make_loader(source, *, batch_size: int, image_size: Optional[int] = None, seed: int = 0,
                shuffle: bool = True, num_epochs: Optional[int] = None, random_crop: bool = True,
                scale: bool = True, process_index: Optional[int] = None,
                process_count: Optional[int] = None, drop_remainder: bool = True,
                worker_count: int = 0, worker_buffer_size: int = 1,
                transforms: Sequence[grain.transforms.Transformation] = (),
                split: str = 'train', regroup: Optional[Callable] = None) -> grain.DataLoader:
    """The training loader of this process.

    Args:
      source: see `as_source` (image-text records, pre-encoded records or `SyntheticImageSource`).
      batch_size: per-process batch; the global batch is batch_size * process_count.
      image_size: output side of the resize + crop; required when records have 'image'.
      seed: shuffle and crop seed (32-bit, >= 0).
      shuffle: global shuffle, a new permutation each epoch.
      num_epochs: None repeats forever.
      random_crop: False gives centre crops (evaluation, pre-encoding).
      scale: float32 images in [-1, 1]; False keeps uint8.
      process_index, process_count: this process's share; default `jax.process_index()` /
        `jax.process_count()` (grain.sharding.ShardByJaxProcess). Give both or neither.
      drop_remainder: drop a last partial batch (only reachable with num_epochs set).
      worker_count: grain worker processes (0: in this process). Each worker batches its own
        slice of the stream, so the grouping of records into batches depends on it (records and
        crops do not). Part of the saved state: a resumed run must use the same value.
      transforms: extra grain transforms applied per record after `Preprocess` (e.g.
        tokenization).
      split: split to read from builders / dataset folders.
      regroup: None, or `regroup(sampler, readers)` -> the sampler to read instead of the
        global-stream `sampler`; readers = process_count x max(worker_count, 1), reader
        p + P*w (process p, worker w) reads positions p + P*w, + readers, ... and batches them
        in that order (`vd_jax.data.hard_negatives`).
    Returns:
      a grain.DataLoader; `it = iter(loader)` yields dicts of stacked arrays: image (B, S, S, 3),
      caption/id str arrays (B,), the records' other fields stacked. `it.get_state()` -> bytes,
      `it.set_state(bytes)` resumes.
    """
    source = as_source(source, split)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f'data source {source!r} is empty')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    if (process_index is None) != (process_count is None):
        raise ValueError('give both process_index and process_count, or neither '
                         f'(got {process_index}, {process_count})')
    if process_index is None:
        shard = grain.sharding.ShardByJaxProcess()
    else:
        shard = grain.sharding.ShardOptions(shard_index=process_index,
                                            shard_count=process_count)
    first = source[0]
    if 'image' in first and not image_size:
        raise ValueError('records have an image of their own size: pass image_size to resize '
                         'and crop them to one training size')
    if worker_count > 0:
        # grain 0.2.18's worker start reads an absl flag directly, which raises
        # UnparsedFlagAccessError unless the program went through absl.app.run; defaults are fine.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    # Sharding is the loader's (strided over the global stream), so the sampler sees all records.
    sampler = grain.samplers.IndexSampler(
        num_records=num_records, shard_options=grain.sharding.NoSharding(), shuffle=shuffle,
        num_epochs=num_epochs, seed=seed)
    if regroup is not None:
        sampler = regroup(sampler, shard.shard_count * max(worker_count, 1))
    operations = [Preprocess(image_size, random_crop, scale), *transforms,
                  grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                            shard_options=shard)
