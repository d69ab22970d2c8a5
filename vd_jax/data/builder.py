"""Image-caption datasets as tensorflow-datasets (tfds) builders, written as ArrayRecord.

No TensorFlow is needed (`vd_jax.data.local_builder`): the builder yields already-encoded image
bytes (tfds only encodes numpy images through TF) and reading goes through
`builder.as_data_source()` (random access, decoded with PIL), which is what grain wants.

Inputs (any mix, given as paths or globs; `vd_jax.data.raw_sources`): folders of images with
`<name>.txt` captions and/or `metadata.jsonl` / `captions.jsonl` lines, and img2dataset /
webdataset tar shards.

The LAION filters of the paper (`vd_jax.data.filters`) are applied where the metadata has the
field; each has its own counter, and so does every reason a sample is skipped (corrupt image
bytes, missing caption, ...). A bad sample never stops the build. The counts end up in the
dataset's `metadata.json` (`prepare_stats(builder)`) and in the log.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import logging
import multiprocessing
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vd_jax.data import filters as F
from vd_jax.data.filters import Filters
from vd_jax.data.local_builder import LocalBuilder, prepare_locally
from vd_jax.data.raw_sources import (CAPTION_JSONL, IMAGE_EXTS, TAR_SUFFIXES, FolderChunk,
                                     RawSample, TarShard, WorkUnit, caption_from, expand,
                                     plan_units)
from vd_jax.errors import DataSourceError
from vd_jax.image_io import pil_to_rgb
from vd_jax.platform import quiet_tfds

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """What to build. `name` names the tfds config (the folder under `<data_dir>/vd_image_text/`).

    sources: folders, tar files, or glob patterns of either.
    num_workers: processes that decode/verify images (0: in this process). Order and content
      of the result do not depend on it.
    chunk_size: loose images per work unit (a tar shard is always one unit).
    """
    sources: Tuple[str, ...] = ()
    filters: Filters = Filters()
    num_workers: int = 0
    chunk_size: int = 256


class VdImageText(LocalBuilder):
    """tfds builder of image-caption records (one 'train' split). See `build_image_text`.

    Record (as returned by `as_data_source()['train'][i]`):
      image            uint8 (H, W, 3), the stored image (original bytes when RGB JPEG/PNG,
                       otherwise re-encoded as lossless PNG after EXIF rotation / RGB conversion)
      caption          bytes (utf-8)
      id               bytes, stable: '<path relative to the sources' common root>' for loose
                       images, '<tar path relative to it>/<key>' for tar samples
      similarity, punsafe, pwatermark   float32, NaN when the metadata lacks them
      original_width, original_height   int32, from metadata or the stored image
      url              bytes, '' when unknown
    tfds stores records in an order shuffled by key: look records up by `id`, not by index.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='Image-caption pairs (local folders or img2dataset tar shards), '
                        'LAION-filtered, for vd_jax.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'caption': tfds.features.Text(),
                'id': tfds.features.Text(),
                'similarity': tfds.features.Scalar(np.float32),
                'punsafe': tfds.features.Scalar(np.float32),
                'pwatermark': tfds.features.Scalar(np.float32),
                'original_width': tfds.features.Scalar(np.int32),
                'original_height': tfds.features.Scalar(np.int32),
                'url': tfds.features.Text(),
            }),
            # Preparation counts (kept, skipped/<reason>, filtered/<filter>) land here and are
            # saved as metadata.json next to the records.
            metadata=tfds.core.MetadataDict(),
        )

    def build_message(self) -> str:
        return (f'building {self.name}/{self.builder_config.name} from '
                f'{list(self.builder_config.sources)} in {self.data_dir}')

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {'train': self._generate_examples()}

    def _generate_examples(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        cfg = self.builder_config
        if not cfg.sources:
            raise ValueError(f"ImageTextConfig '{cfg.name}' has no sources")
        counts: collections.Counter = collections.Counter()
        units = plan_units(cfg.sources, cfg.chunk_size, counts)
        for examples, unit_counts in _map_units(units, cfg.filters, cfg.num_workers):
            counts.update(unit_counts)
            for example in examples:
                yield example['id'], example
        stats = dict(sorted(counts.items()))
        self.info.metadata['counts'] = stats
        self.info.metadata['sources'] = list(cfg.sources)
        self.info.metadata['filters'] = dataclasses.asdict(cfg.filters)
        _log_stats(cfg.name, stats)
        if counts['kept'] == 0:
            # tfds cannot write an empty split; say why instead of its generic error.
            raise DataSourceError(f'no usable sample in {list(cfg.sources)}: counts {stats}')


def build_image_text(sources, data_dir: str, *, name: str = 'default',
                     filters: Filters = Filters(), num_workers: int = 0,
                     chunk_size: int = 256) -> VdImageText:
    """Build (or reuse) the ArrayRecord dataset `<data_dir>/vd_image_text/<name>/1.0.0`.

    Args:
      sources: a path or glob, or a sequence of them: folders (loose images + captions, and any
        tar shards inside), tar shards.
      data_dir: tfds data_dir.
      name: config name; give each distinct source set its own name. A prepared dataset of
        that name is reused if it was built from the same sources and filters (else ValueError).
      filters: LAION thresholds (`Filters.none()` to keep everything decodable and captioned).
      num_workers: processes for decoding/verifying images.
    Returns:
      the prepared builder: `builder.as_data_source()['train']` for records,
      `prepare_stats(builder)` for the counts.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = (sources,)
    config = ImageTextConfig(name=name, sources=tuple(os.fspath(s) for s in sources),
                             filters=filters, num_workers=num_workers, chunk_size=chunk_size)
    with quiet_tfds():
        builder = VdImageText(config=config, data_dir=data_dir, file_format='array_record')
        prepared = builder.is_prepared()
    if prepared:
        # tfds would silently reuse it; stale data built from other inputs is a bug, not a cache
        made = (builder.info.metadata.get('sources'), builder.info.metadata.get('filters'))
        if made != (list(config.sources), dataclasses.asdict(filters)):
            raise ValueError(f"dataset '{name}' in {builder.data_dir} was built from sources "
                             f'{made[0]} with filters {made[1]}, not {list(config.sources)} / '
                             f'{dataclasses.asdict(filters)}: use another name or delete it')
        return builder
    check_sources(config.sources)  # before tfds creates any folder
    prepare_locally(builder, data_dir)
    return builder


def check_sources(sources) -> Dict[str, int]:
    """Check that `sources` can make a dataset, listing files only (no image is decoded).

    Raises:
      FileNotFoundError: a source does not exist.
      DataSourceError: the loose-image folders hold no images, or images but no captions (no
        `<name>.txt` beside any image and no caption in a metadata.jsonl), and there are no tar
        shards (whose captions are only known once read).
    Returns:
      {'images': loose images, 'captioned': those with a caption file or jsonl caption,
       'tar_shards': tar files}.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = (sources,)
    sources = [os.fspath(s) for s in sources]
    units = plan_units(sources, chunk_size=1 << 30, counts=collections.Counter())
    items = [it for u in units if isinstance(u, FolderChunk) for it in u.items]
    found = dict(images=len(items),
                 captioned=sum(1 for it in items if it.caption_path or
                               caption_from(it.meta or {}) is not None),
                 tar_shards=sum(1 for u in units if isinstance(u, TarShard)))
    where = sources[0] if len(sources) == 1 else sources
    if found['tar_shards'] == 0 and found['images'] == 0:
        raise DataSourceError(
            f"no images in {where!r} ({_describe(sources)}): expected "
            f"{'/'.join('.' + e for e in IMAGE_EXTS)} files with captions, or "
            f"{'/'.join(TAR_SUFFIXES)} shards")
    if found['tar_shards'] == 0 and found['captioned'] == 0:
        example = os.path.basename(items[0].path)
        stem = os.path.splitext(example)[0]
        raise DataSourceError(
            f"{found['images']} images but no captions in {where!r} (expected {stem}.txt beside "
            f"{example}, or a {' / '.join(CAPTION_JSONL)} with file_name and text per line)")
    return found


def _describe(sources: Sequence[str]) -> str:
    """'it is empty' / 'it has 3 files: a.txt, b.csv, ...' for the folder sources."""
    files = []
    for src in sources:
        for m in expand(src):
            if os.path.isdir(m):
                files.extend(os.path.relpath(os.path.join(d, f), m)
                             for d, _, fs in os.walk(m) for f in sorted(fs))
    if not files:
        return 'it is empty' if len(sources) == 1 else 'they are empty'
    shown = ', '.join(files[:5]) + (', ...' if len(files) > 5 else '')
    return f"{len(files)} other file{'s' if len(files) > 1 else ''}: {shown}"


def prepare_stats(builder) -> Dict[str, int]:
    """The preparation counts of a prepared builder (`{}` if it has none)."""
    return dict(builder.info.metadata.get('counts', {})) if builder.info.metadata else {}


def open_dataset(path: str, split: str = 'train'):
    """Random-access source of a prepared dataset folder (`.../<name>/<version>`), by any vd_jax
    builder (image-text or pre-encoded); no builder class needed."""
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
        raise FileNotFoundError(f"'{path}' is not a prepared tfds dataset folder "
                                '(no dataset_info.json)')
    return tfds.builder_from_directory(path).as_data_source(split=split)


# ----------------------------------------------------------------------------------------
# work units -> examples (runs in worker processes when num_workers > 0)
# ----------------------------------------------------------------------------------------

def _map_units(units, filters: Filters, num_workers: int):
    """Yield (examples, counts) per unit, in unit order."""
    if num_workers <= 0:
        for unit in units:
            yield _process_unit(unit, filters)
        return
    # spawn, not fork: the parent may hold JAX/XLA threads. At most 2 units per worker in flight
    # so memory stays bounded on big shard lists.
    ctx = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        pending: collections.deque = collections.deque()
        it = iter(units)
        for unit in it:
            pending.append(pool.submit(_process_unit, unit, filters))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _process_unit(unit: WorkUnit, filters: Filters):
    counts: collections.Counter = collections.Counter()
    examples = []
    for sample in unit.samples(counts):
        ex = _make_example(sample, filters, counts)
        if ex is not None:
            examples.append(ex)
    return examples, counts


def _make_example(sample: RawSample, filters: Filters,
                  counts: collections.Counter) -> Optional[Dict[str, Any]]:
    """Validate one sample; return its record or None (with the reason counted).

    Order: caption, score filters (no decode needed), image decode, size filters. Each sample is
    counted once, under the first reason that drops it.
    """
    counts['seen'] += 1
    caption, meta = sample.caption, sample.meta
    if caption is None or not caption.strip():
        counts['skipped/missing_caption'] += 1
        return None
    scores = F.scores(meta)
    if not F.passes_scores(scores, filters, counts):
        return None
    try:
        stored, size = normalize_image_bytes(sample.image_bytes)
    except Exception:  # noqa: BLE001 -- PIL raises many types on bad bytes; all mean "corrupt"
        counts['skipped/corrupt_image'] += 1
        return None
    ow, oh = F.original_size(meta, size)
    if not F.passes_size(ow, oh, filters, counts):
        return None
    counts['kept'] += 1
    url = meta.get('url', meta.get('URL'))
    return {'image': stored, 'caption': caption.strip(), 'id': sample.uid,
            **{k: np.float32(v) for k, v in scores.items()},
            'original_width': np.int32(ow), 'original_height': np.int32(oh),
            'url': url if isinstance(url, str) else ''}


def normalize_image_bytes(data: bytes) -> Tuple[bytes, Tuple[int, int]]:
    """Fully decode `data`; return bytes that decode to an upright RGB image, and its (W, H).

    RGB JPEG/PNG without EXIF rotation are kept byte for byte. Anything else (grey, 16-bit,
    palette, alpha, CMYK, webp, rotated) is converted exactly as inference reads files
    (`vd_jax.image_io.pil_to_rgb`: EXIF orientation applied, 16-bit scaled, alpha composited
    on white) and re-encoded as PNG, so the reader (PIL `np.asarray`) always gets (H, W, 3).
    Raises (OSError, ValueError, ...) on bytes PIL cannot decode, incl. truncated files.
    """
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        orientation = im.getexif().get(0x0112, 1)
        im.load()  # full decode: truncated data raises here, not at training time
        if fmt in ('JPEG', 'PNG') and im.mode == 'RGB' and orientation == 1:
            return data, im.size
        im = Image.fromarray(pil_to_rgb(im))
        buf = io.BytesIO()
        im.save(buf, format='PNG')
        return buf.getvalue(), im.size


def _log_stats(name: str, stats: Mapping[str, int]) -> None:
    dropped = {k: v for k, v in stats.items() if k.startswith(('skipped/', 'filtered/'))}
    msg = (f"vd_image_text/{name}: kept {stats.get('kept', 0)} of {stats.get('seen', 0)} "
           f'samples; dropped {dropped or "none"}')
    unchecked = {k: v for k, v in stats.items() if k.startswith('unchecked/')}
    if unchecked:
        msg += f'; no metadata for {unchecked}'
    (logger.warning if any(k.startswith('skipped/') and v for k, v in stats.items())
     else logger.info)(msg)
