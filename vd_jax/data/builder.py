"""Image-caption datasets as tensorflow-datasets (tfds) builders, written as ArrayRecord.

No TensorFlow is needed: the builder yields already-encoded image bytes (tfds only encodes numpy
images through TF), ArrayRecord is written by the `array_record` package, and reading goes
through `builder.as_data_source()` (random access, decoded with PIL), which is what grain wants.

Inputs (any mix, given as paths or globs):
  * a folder of images `<name>.jpg|jpeg|png|webp` with captions from `<name>.txt` side files
    and/or `metadata.jsonl` / `captions.jsonl` lines `{"file_name": ..., "text": ..., <LAION
    fields>}` (the Hugging Face imagefolder convention; `file_name` is relative to the jsonl);
  * tar shards in img2dataset/webdataset layout: `<key>.jpg`, `<key>.txt`, `<key>.json`.

The LAION filters of the paper are applied where the metadata has the field; each has its own
counter, and so does every reason a sample is skipped (corrupt image bytes, missing caption,
...). A bad sample never stops the build. The counts end up in the dataset's `metadata.json`
(`prepare_stats(builder)`) and in the log.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import io
import json
import logging
import math
import multiprocessing
import os
import posixpath
import shutil
import tarfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from vd_jax.image_io import pil_to_rgb
from vd_jax.platform import quiet_tfds

logger = logging.getLogger(__name__)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_JSONL = ('metadata.jsonl', 'captions.jsonl')
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
# A float field that is absent (or null/NaN in the metadata) is stored as NaN.
FLOAT_FIELDS = ('similarity', 'punsafe', 'pwatermark')
# Where the *original* image size lives: img2dataset json and LAION parquet columns. The stored
# image is often resized by img2dataset, so its own size is only the fallback.
_WIDTH_KEYS = ('original_width', 'WIDTH')
_HEIGHT_KEYS = ('original_height', 'HEIGHT')


class DataSourceError(ValueError):
    """The given sources cannot make an image-caption dataset (no images, no captions, no
    usable sample); the message names the sources and what was found."""


@dataclasses.dataclass(frozen=True)
class Filters:
    """LAION filters (VD paper, section on data). `None` disables one.

    A sample is kept when similarity > min_similarity, punsafe < max_punsafe,
    pwatermark < max_pwatermark, min_aspect_ratio <= width/height <= max_aspect_ratio and
    width*height >= min_area (original size if the metadata has it, else the stored image's).
    The three score filters only apply to samples whose metadata has the score.
    """
    min_similarity: Optional[float] = 0.3   # CLIP image-text cosine similarity
    max_punsafe: Optional[float] = 0.3      # NSFW probability
    max_pwatermark: Optional[float] = 0.3   # watermark probability
    min_aspect_ratio: Optional[float] = 0.6
    max_aspect_ratio: Optional[float] = 1.667
    min_area: Optional[float] = 256 * 256 * 0.75

    @classmethod
    def none(cls) -> 'Filters':
        """No filtering at all."""
        return cls(None, None, None, None, None, None)


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


class VdImageText(tfds.core.GeneratorBasedBuilder):
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
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' default looks the module up through `importlib_resources`, a package tfds
        # 4.9.10 uses but does not declare (fails for builders inside an installed package).
        return epath.Path(__file__)

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

    # tfds prints "Downloading and preparing dataset Unknown size ..." (and a "downloaded"
    # line) to stdout; nothing is downloaded here, so say what happens through our logger.
    def _log_download_bytes(self) -> None:
        logger.info('building %s/%s from %s in %s', self.name, self.builder_config.name,
                    list(self.builder_config.sources), self.data_dir)

    def _log_download_done(self) -> None:
        logger.info('built %s in %s', self.name, self.data_dir)

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {'train': self._generate_examples()}

    def _generate_examples(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        cfg = self.builder_config
        if not cfg.sources:
            raise ValueError(f"ImageTextConfig '{cfg.name}' has no sources")
        counts: collections.Counter = collections.Counter()
        units = _plan_units(cfg.sources, cfg.chunk_size, counts)
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
    # Folders this build creates; removed again if it fails (a failed build leaves nothing).
    downloads = os.path.join(data_dir, 'downloads')  # tfds' download manager makes it
    created = [p for p in (data_dir, downloads, os.path.join(data_dir, builder.name),
                           os.path.join(data_dir, builder.name, name)) if not os.path.lexists(p)]
    try:
        with quiet_tfds():
            builder.download_and_prepare()
    except BaseException:
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
        raise
    if downloads in created and not any(fs for _, _, fs in os.walk(downloads)):
        shutil.rmtree(downloads, ignore_errors=True)  # nothing is downloaded for local sources
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
    units = _plan_units(sources, chunk_size=1 << 30, counts=collections.Counter())
    items = [it for u in units if u[0] == 'folder' for it in u[1]]
    found = dict(images=len(items),
                 captioned=sum(1 for it in items if it.caption_path or
                               _caption_from(it.meta or {}) is not None),
                 tar_shards=sum(1 for u in units if u[0] == 'tar'))
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
        for m in (sorted(glob.glob(src)) if any(c in src for c in '*?[') else [src]):
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
# planning: sources -> work units
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _FolderItem:
    path: str                      # image file
    uid: str
    caption_path: Optional[str]    # <name>.txt beside it
    meta: Optional[Dict[str, Any]]  # its jsonl line


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _plan_units(sources: Sequence[str], chunk_size: int, counts) -> List[tuple]:
    """Resolve sources to folders and tar files, then cut them into work units.

    Ids are paths relative to the common root of everything, so they are unique (distinct files,
    distinct keys inside a tar) and stable across rebuilds from the same sources.
    """
    folders, tars = [], []
    for src in sources:
        matches = sorted(glob.glob(src)) if any(c in src for c in '*?[') else [src]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"dataset source '{src}' does not exist")
        for m in matches:
            m = os.path.realpath(m)
            if os.path.isdir(m):
                folders.append(m)
                tars.extend(sorted(os.path.join(d, f) for d, _, fs in os.walk(m)
                                   for f in fs if _is_tar(f)))
            elif _is_tar(m):
                tars.append(m)
            else:
                raise ValueError(f"dataset source '{m}' is neither a folder nor a tar shard "
                                 f'({"/".join(TAR_SUFFIXES)})')
    # a folder inside another listed folder would be scanned twice (duplicate ids)
    folders = [f for f in dict.fromkeys(folders)
               if not any(f.startswith(g + os.sep) for g in folders)]
    tars = list(dict.fromkeys(tars))
    root = os.path.commonpath(folders + [os.path.dirname(t) for t in tars])

    def rel(p):
        return os.path.relpath(p, root).replace(os.sep, '/')

    units: List[tuple] = []
    for folder in folders:
        items = _scan_folder(folder, rel, counts)
        units.extend(('folder', items[i:i + chunk_size]) for i in range(0, len(items), chunk_size))
    units.extend(('tar', t, rel(t)) for t in tars)
    return units


def _scan_folder(folder: str, rel, counts) -> List[_FolderItem]:
    """List a folder's images with their caption file and jsonl metadata (no image I/O)."""
    metas: Dict[str, Dict[str, Any]] = {}
    images = []
    for d, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            if f in CAPTION_JSONL:
                _read_jsonl(p, metas, counts)
            elif f.rpartition('.')[2].lower() in IMAGE_EXTS:
                images.append(p)
    items = []
    for p in images:
        txt = os.path.splitext(p)[0] + '.txt'
        items.append(_FolderItem(p, rel(p), txt if os.path.isfile(txt) else None,
                                 metas.pop(os.path.normpath(p), None)))
    # jsonl lines naming files that are not there
    if metas:
        counts['seen'] += len(metas)
        counts['skipped/missing_image'] += len(metas)
    return items


def _read_jsonl(path: str, metas: Dict[str, Dict[str, Any]], counts) -> None:
    with open(path, 'rb') as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                target = os.path.normpath(os.path.join(os.path.dirname(path),
                                                       entry['file_name']))
            except (ValueError, KeyError, TypeError):
                # a line we cannot attach to an image: its image (if any) then has no metadata
                counts['skipped/bad_metadata'] += 1
                continue
            metas[target] = entry


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


def _process_unit(unit: tuple, filters: Filters):
    counts: collections.Counter = collections.Counter()
    examples = []
    samples = _folder_samples(unit[1], counts) if unit[0] == 'folder' else \
        _tar_samples(unit[1], unit[2], counts)
    for uid, image_bytes, caption, meta in samples:
        ex = _make_example(uid, image_bytes, caption, meta, filters, counts)
        if ex is not None:
            examples.append(ex)
    return examples, counts


def _folder_samples(items: Sequence[_FolderItem], counts):
    for item in items:
        try:
            with open(item.path, 'rb') as f:
                data = f.read()
        except OSError:
            counts['seen'] += 1
            counts['skipped/corrupt_image'] += 1
            continue
        meta = item.meta or {}
        caption = _caption_from(meta)
        if caption is None and item.caption_path:
            with open(item.caption_path, 'rb') as f:
                caption = f.read().decode('utf-8', errors='replace')
        yield item.uid, data, caption, meta


def _tar_samples(path: str, rel_path: str, counts):
    """Group a webdataset tar's members by key (basename up to its first dot) and yield samples.

    Members are indexed first so a key's files need not be adjacent; a truncated tar yields the
    samples read before the damage and counts `skipped/corrupt_shard`.
    """
    try:
        tar = tarfile.open(path, 'r:*')
    except (tarfile.TarError, OSError, EOFError):
        counts['skipped/corrupt_shard'] += 1
        return
    with tar:
        groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                d, base = posixpath.split(member.name)
                stem, _, ext = base.partition('.')
                if not stem or not ext:
                    continue
                groups.setdefault(posixpath.join(d, stem), {})[ext.lower()] = member
        except (tarfile.TarError, OSError, EOFError):
            counts['skipped/corrupt_shard'] += 1
        for key, files in groups.items():
            uid = f'{rel_path}/{key}'
            image_ext = next((e for e in IMAGE_EXTS if e in files), None)
            if image_ext is None:
                counts['seen'] += 1
                counts['skipped/missing_image'] += 1
                continue
            try:
                data = tar.extractfile(files[image_ext]).read()
                meta = json.loads(tar.extractfile(files['json']).read()) if 'json' in files \
                    else {}
                if not isinstance(meta, dict):
                    raise ValueError('sample json is not an object')
            except (tarfile.TarError, OSError, EOFError):
                counts['seen'] += 1
                counts['skipped/corrupt_image'] += 1
                continue
            except ValueError:
                # unreadable metadata: the score filters could not be applied, so drop it
                counts['seen'] += 1
                counts['skipped/bad_metadata'] += 1
                continue
            caption = None
            if 'txt' in files:
                try:
                    caption = tar.extractfile(files['txt']).read().decode('utf-8', 'replace')
                except (tarfile.TarError, OSError, EOFError):
                    caption = None
            if caption is None:
                caption = _caption_from(meta)
            yield uid, data, caption, meta


def _caption_from(meta: Mapping[str, Any]) -> Optional[str]:
    for k in ('text', 'caption', 'TEXT'):
        v = meta.get(k)
        if isinstance(v, str):
            return v
    return None


def _meta_float(meta: Mapping[str, Any], keys: Sequence[str]) -> float:
    """The first present, finite numeric value among `keys`, else NaN."""
    for k in keys:
        v = meta.get(k)
        if v is None or isinstance(v, bool):
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            return v
    return math.nan


def _make_example(uid, image_bytes, caption, meta, filters: Filters, counts):
    """Validate one sample; return its record or None (with the reason counted).

    Order: caption, score filters (no decode needed), image decode, size filters. Each sample is
    counted once, under the first reason that drops it.
    """
    counts['seen'] += 1
    if caption is None or not caption.strip():
        counts['skipped/missing_caption'] += 1
        return None
    caption = caption.strip()
    scores = {k: _meta_float(meta, (k,)) for k in FLOAT_FIELDS}
    for field, limit, keep in (
            ('similarity', filters.min_similarity, lambda v, t: v > t),
            ('punsafe', filters.max_punsafe, lambda v, t: v < t),
            ('pwatermark', filters.max_pwatermark, lambda v, t: v < t)):
        if limit is None:
            continue
        if math.isnan(scores[field]):
            counts[f'unchecked/{field}'] += 1
        elif not keep(scores[field], limit):
            counts[f'filtered/{field}'] += 1
            return None
    try:
        stored, (w, h) = normalize_image_bytes(image_bytes)
    except Exception:  # noqa: BLE001 -- PIL raises many types on bad bytes; all mean "corrupt"
        counts['skipped/corrupt_image'] += 1
        return None
    ow, oh = _meta_float(meta, _WIDTH_KEYS), _meta_float(meta, _HEIGHT_KEYS)
    if math.isnan(ow) or math.isnan(oh) or ow <= 0 or oh <= 0:
        ow, oh = w, h
    aspect = ow / oh
    if ((filters.min_aspect_ratio is not None and aspect < filters.min_aspect_ratio)
            or (filters.max_aspect_ratio is not None and aspect > filters.max_aspect_ratio)):
        counts['filtered/aspect_ratio'] += 1
        return None
    if filters.min_area is not None and ow * oh < filters.min_area:
        counts['filtered/min_area'] += 1
        return None
    counts['kept'] += 1
    url = meta.get('url', meta.get('URL'))
    return {'image': stored, 'caption': caption, 'id': uid,
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
