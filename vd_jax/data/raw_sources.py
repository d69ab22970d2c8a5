"""Raw image-caption sources: what `vd_jax.data.builder` reads before it decodes anything.

  * a folder of images `<name>.jpg|jpeg|png|webp` with captions from `<name>.txt` side files
    and/or `metadata.jsonl` / `captions.jsonl` lines `{"file_name": ..., "text": ..., <LAION
    fields>}` (the Hugging Face imagefolder convention; `file_name` is relative to the jsonl);
  * tar shards in img2dataset/webdataset layout: `<key>.jpg`, `<key>.txt`, `<key>.json`.

`plan_units` resolves the sources into work units (`FolderChunk`: loose images, `TarShard`:
one tar file); each unit yields `RawSample`s (id, image bytes, caption, metadata) with every
reason a sample cannot be read counted (`skipped/<reason>`). Units are picklable: the builder
hands them to worker processes.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import posixpath
import tarfile
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_JSONL = ('metadata.jsonl', 'captions.jsonl')
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')


class RawSample(NamedTuple):
    """One sample as read, before decoding or filtering."""
    uid: str                       # stable id (see `plan_units`)
    image_bytes: bytes
    caption: Optional[str]         # None when there is none
    meta: Mapping[str, Any]        # its jsonl line / tar json ({} if none)


class FolderItem(NamedTuple):
    """A loose image found by listing a folder (no image I/O yet)."""
    path: str                      # image file
    uid: str
    caption_path: Optional[str]    # <name>.txt beside it
    meta: Optional[Dict[str, Any]]  # its jsonl line


class FolderChunk(NamedTuple):
    """Work unit: up to `chunk_size` loose images of one folder."""
    items: Tuple[FolderItem, ...]

    def samples(self, counts: collections.Counter) -> Iterator[RawSample]:
        for item in self.items:
            try:
                with open(item.path, 'rb') as f:
                    data = f.read()
            except OSError:
                counts['seen'] += 1
                counts['skipped/corrupt_image'] += 1
                continue
            meta = item.meta or {}
            caption = caption_from(meta)
            if caption is None and item.caption_path:
                with open(item.caption_path, 'rb') as f:
                    caption = f.read().decode('utf-8', errors='replace')
            yield RawSample(item.uid, data, caption, meta)


class TarShard(NamedTuple):
    """Work unit: one webdataset tar shard; sample ids are `<rel_path>/<key>`."""
    path: str
    rel_path: str

    def samples(self, counts: collections.Counter) -> Iterator[RawSample]:
        """Group the tar's members by key (basename up to its first dot) and yield samples.

        Members are indexed first so a key's files need not be adjacent; a truncated tar yields
        the samples read before the damage and counts `skipped/corrupt_shard`.
        """
        try:
            tar = tarfile.open(self.path, 'r:*')
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
                sample = _tar_sample(tar, f'{self.rel_path}/{key}', files, counts)
                if sample is not None:
                    yield sample


WorkUnit = Union[FolderChunk, TarShard]


def _tar_sample(tar: tarfile.TarFile, uid: str, files: Mapping[str, tarfile.TarInfo],
                counts: collections.Counter) -> Optional[RawSample]:
    """The sample of one key's members, or None with the reason counted."""
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        counts['seen'] += 1
        counts['skipped/missing_image'] += 1
        return None
    try:
        data = tar.extractfile(files[image_ext]).read()
        meta = json.loads(tar.extractfile(files['json']).read()) if 'json' in files else {}
        if not isinstance(meta, dict):
            raise ValueError('sample json is not an object')
    except (tarfile.TarError, OSError, EOFError):
        counts['seen'] += 1
        counts['skipped/corrupt_image'] += 1
        return None
    except ValueError:
        # unreadable metadata: the score filters could not be applied, so drop it
        counts['seen'] += 1
        counts['skipped/bad_metadata'] += 1
        return None
    caption = None
    if 'txt' in files:
        try:
            caption = tar.extractfile(files['txt']).read().decode('utf-8', 'replace')
        except (tarfile.TarError, OSError, EOFError):
            caption = None
    if caption is None:
        caption = caption_from(meta)
    return RawSample(uid, data, caption, meta)


def caption_from(meta: Mapping[str, Any]) -> Optional[str]:
    """The caption of a metadata dict ('text', 'caption' or 'TEXT'), or None."""
    for k in ('text', 'caption', 'TEXT'):
        v = meta.get(k)
        if isinstance(v, str):
            return v
    return None


def is_tar(path: str) -> bool:
    """Whether a file name is a tar shard (`TAR_SUFFIXES`)."""
    return path.lower().endswith(TAR_SUFFIXES)


def expand(src: str) -> List[str]:
    """The paths a source names: the sorted matches of a glob pattern, else the path itself."""
    return sorted(glob.glob(src)) if any(c in src for c in '*?[') else [src]


def plan_units(sources: Sequence[str], chunk_size: int,
               counts: collections.Counter) -> List[WorkUnit]:
    """Resolve sources to folders and tar files, then cut them into work units.

    Ids are paths relative to the common root of everything, so they are unique (distinct files,
    distinct keys inside a tar) and stable across rebuilds from the same sources.

    Raises:
      FileNotFoundError: a source (or every match of a glob) does not exist.
      ValueError: a source is neither a folder nor a tar shard.
    """
    folders, tars = [], []
    for src in sources:
        matches = expand(src)
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"dataset source '{src}' does not exist")
        for m in matches:
            m = os.path.realpath(m)
            if os.path.isdir(m):
                folders.append(m)
                tars.extend(sorted(os.path.join(d, f) for d, _, fs in os.walk(m)
                                   for f in fs if is_tar(f)))
            elif is_tar(m):
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

    units: List[WorkUnit] = []
    for folder in folders:
        items = _scan_folder(folder, rel, counts)
        units.extend(FolderChunk(tuple(items[i:i + chunk_size]))
                     for i in range(0, len(items), chunk_size))
    units.extend(TarShard(t, rel(t)) for t in tars)
    return units


def _scan_folder(folder: str, rel, counts: collections.Counter) -> List[FolderItem]:
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
        items.append(FolderItem(p, rel(p), txt if os.path.isfile(txt) else None,
                                metas.pop(os.path.normpath(p), None)))
    # jsonl lines naming files that are not there
    if metas:
        counts['seen'] += len(metas)
        counts['skipped/missing_image'] += len(metas)
    return items


def _read_jsonl(path: str, metas: Dict[str, Dict[str, Any]], counts: collections.Counter) -> None:
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
