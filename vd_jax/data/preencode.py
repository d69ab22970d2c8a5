"""Pre-encode a dataset once through the frozen encoders (VAE latents, CLIP contexts, ...).

Training on the stored outputs skips the encoders (the maxdiffusion `cache_latents_...` idea).
The result is another ArrayRecord tfds dataset, read by the same `make_loader` (its records have
no 'image', so no resize happens). Each image is centre-cropped once: random-crop augmentation is
given up in exchange, as in every latent-caching pipeline.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from vd_jax.data.loader import Preprocess, as_source
from vd_jax.data.local_builder import LocalBuilder, prepare_locally

logger = logging.getLogger(__name__)

RESERVED = ('caption', 'id')
# dtypes tfds can serialize without TF (bfloat16 it cannot: cast in encode_fn)
_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int8, np.int16,
                                      np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                      np.bool_))


@dataclasses.dataclass(eq=False)
class EncodedConfig(tfds.core.BuilderConfig):
    """spec: output name -> (per-record shape, numpy dtype name); fixed by the first batch."""
    spec: Dict[str, Tuple[Tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
    image_size: int = 0


class VdEncoded(LocalBuilder):
    """tfds builder of pre-encoded records; written only by `preencode`.

    Record: every `encode_fn` output (its per-record shape and dtype), caption bytes, id bytes.
    """
    def __init__(self, *, examples: Optional[Iterator[Tuple[str, Dict[str, Any]]]] = None,
                 **kwargs):
        self._examples = iter(()) if examples is None else examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        features = {k: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))
                    for k, (shape, dtype) in spec.items()}
        features.update(caption=tfds.features.Text(), id=tfds.features.Text())
        return tfds.core.DatasetInfo(
            builder=self, description='Pre-encoded latents/contexts for vd_jax training.',
            features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._examples}

    def _generate_examples(self):  # examples come from `preencode` (see _split_generators)
        raise NotImplementedError


def preencode(dataset, encode_fn: Callable[[Dict[str, np.ndarray]], Mapping[str, Any]],
              out_dir: str, *, image_size: int, batch_size: int = 8, name: str = 'default',
              split: str = 'train', overwrite: bool = False) -> VdEncoded:
    """Run `encode_fn` over every record once and store its outputs with the captions.

    Args:
      dataset: image-text records (see `as_source`: a source, builder or dataset path).
      encode_fn: batch -> dict of arrays with leading dim B. The batch is
        {'image': float32 (B, S, S, 3) in [-1, 1] (centre crop), 'caption': str (B,),
        'id': str (B,)}. B is always `batch_size`: the last batch is padded by repeating its last
        record (so a jitted encode_fn compiles once) and the padding is dropped afterwards.
        Outputs may be jax arrays; 'caption' and 'id' are reserved names.
      out_dir: tfds data_dir; the dataset lands in `<out_dir>/vd_encoded/<name>/1.0.0`.
      image_size: crop side S.
      batch_size: records per encode_fn call.
      name: config name.
      overwrite: rebuild an existing dataset of that name (else it is reused as is).
    Returns:
      the prepared builder (`.as_data_source()['train']`, or pass it to `make_loader`).
    """
    source = as_source(dataset, split)
    n = len(source)
    if n == 0:
        raise ValueError(f'data source {source!r} is empty')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    existing = os.path.join(out_dir, 'vd_encoded', name, str(VdEncoded.VERSION))
    if os.path.isfile(os.path.join(existing, 'dataset_info.json')):
        if not overwrite:
            logger.info('reusing pre-encoded dataset %s', existing)
            return tfds.builder_from_directory(existing)
        shutil.rmtree(existing)

    batches = _encoded_batches(source, encode_fn, image_size, batch_size)
    first = next(batches)
    spec = {k: (tuple(v.shape[1:]), v.dtype.name) for k, v in first.items()
            if k not in RESERVED}
    examples = (item for batch in itertools.chain([first], batches)
                for item in _split_batch(batch, spec))
    config = EncodedConfig(name=name, spec=spec, image_size=image_size)
    builder = VdEncoded(examples=examples, config=config, data_dir=out_dir,
                        file_format='array_record')
    builder.info.metadata.update(num_records=n, image_size=image_size)
    prepare_locally(builder, out_dir)
    return builder


def _encoded_batches(source, encode_fn, image_size: int, batch_size: int):
    """Yield dicts of numpy arrays (real records only) in source order."""
    pre = Preprocess(image_size, random_crop=False, scale=True)
    n = len(source)
    for start in range(0, n, batch_size):
        records = [pre.random_map(source[i], None) for i in range(start, min(n, start + batch_size))]
        real = len(records)
        records += [records[-1]] * (batch_size - real)
        for r in records[:real]:
            if 'image' not in r or 'caption' not in r:
                raise ValueError(f"record {r.get('id', '?')!r} lacks 'image' or 'caption' "
                                 f'(has {sorted(r)})')
        ids = [str(r.get('id', start + j)) for j, r in enumerate(records)]
        batch = {'image': np.stack([r['image'] for r in records]),
                 'caption': np.array([r['caption'] for r in records]),
                 'id': np.array(ids)}
        out = encode_fn(batch)
        if not isinstance(out, Mapping) or not out:
            raise ValueError(f'encode_fn must return a non-empty dict of arrays, got {type(out)}')
        result = {}
        for k, v in out.items():
            if k in RESERVED:
                raise ValueError(f"encode_fn output '{k}' clashes with a stored field "
                                 f'({", ".join(RESERVED)})')
            v = np.asarray(v)
            if v.ndim == 0 or v.shape[0] != batch_size:
                raise ValueError(f"encode_fn output '{k}' has shape {v.shape}; its leading dim "
                                 f'must be the batch size {batch_size}')
            if v.dtype not in _DTYPES:
                raise ValueError(f"encode_fn output '{k}' has dtype {v.dtype}, which tfds cannot "
                                 'store without TensorFlow: cast it (e.g. bfloat16 -> float16)')
            result[k] = v[:real]
        result['caption'] = batch['caption'][:real]
        result['id'] = batch['id'][:real]
        yield result


def _split_batch(batch: Mapping[str, np.ndarray], spec):
    for j in range(len(batch['id'])):
        example = {}
        for k, (shape, dtype) in spec.items():
            if k not in batch or batch[k].shape[1:] != shape or batch[k].dtype.name != dtype:
                got = (batch[k].shape[1:], batch[k].dtype.name) if k in batch else 'missing'
                raise ValueError(f"encode_fn output '{k}' changed between batches: first "
                                 f'{(shape, dtype)}, now {got}')
            example[k] = batch[k][j]
        extra = set(batch) - set(spec) - set(RESERVED)
        if extra:
            raise ValueError(f'encode_fn returned new outputs {sorted(extra)} after the first batch')
        example['caption'] = str(batch['caption'][j])
        example['id'] = str(batch['id'][j])
        yield example['id'], example
