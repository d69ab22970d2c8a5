"""vd_jax input pipeline: tfds ArrayRecord datasets (no TensorFlow) read by grain.

  build_image_text(sources, data_dir, ...)  folders / img2dataset tar shards -> LAION-filtered
                                            image-caption dataset (`VdImageText` builder)
  check_sources(sources)                    fail fast (`vd_jax.errors.DataSourceError`) on
                                            images or no captions; build_image_text calls it
  make_loader(source, batch_size=..., image_size=..., ...)
                                            deterministic, process-sharded, resumable batches
  SyntheticImageSource(n, size)                  random records for tests, same loader
  preencode(dataset, encode_fn, out_dir, image_size=...)
                                            store encoder outputs once (`VdEncoded` builder)
  open_dataset(path)                        random-access source of any prepared folder

Record formats are documented on `VdImageText` and `VdEncoded`; a batch is a dict of stacked
numpy arrays (see `make_loader`).
"""
from vd_jax.data.builder import (ImageTextConfig, VdImageText, build_image_text, check_sources,
                                 normalize_image_bytes, open_dataset, prepare_stats)
from vd_jax.data.filters import Filters
from vd_jax.data.loader import (Preprocess, SyntheticImageSource, as_source, make_loader,
                                resize_and_crop)
from vd_jax.data.preencode import EncodedConfig, VdEncoded, preencode

__all__ = ['Filters', 'ImageTextConfig', 'VdImageText', 'build_image_text',
           'check_sources',
           'normalize_image_bytes', 'open_dataset', 'prepare_stats', 'Preprocess',
           'SyntheticImageSource', 'as_source', 'make_loader', 'resize_and_crop', 'EncodedConfig',
           'VdEncoded', 'preencode']
