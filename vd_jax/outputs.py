"""Writing results people look at: PNGs, grids with their settings, text files, run records."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vd_jax import __version__
from vd_jax.errors import InputError
from vd_jax.platform import stderr_is_tty


def check_can_create(path: str, what: str) -> None:
    """`path` (which need not exist) can be created: its nearest existing ancestor is a
    writable folder. `what` names the path in the message (a flag, 'output', ...)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"cannot create {what} '{path}': '{parent}' is a file, not a "
                         'folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {what} '{path}': no permission to write in "
                         f"'{parent}'")


def check_output_folder(path: str, what: str) -> None:
    """`path` is a writable folder or can become one (checked before any long work, so results
    are never lost at the end). Raises InputError."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise InputError(f"{what} '{path}' is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{what} '{path}' is not writable (no permission to write "
                             'in it)')
        return
    check_can_create(path, what)


def new_run_dir(root: str, prefix: str = 'run') -> str:
    """A fresh `root/<prefix>-NNN` folder; earlier runs are never touched."""
    os.makedirs(root, exist_ok=True)
    taken = [d for d in os.listdir(root) if d.startswith(prefix + '-')]
    nums = [int(d.rsplit('-', 1)[1]) for d in taken if d.rsplit('-', 1)[1].isdigit()]
    n = max(nums, default=0) + 1
    while True:
        path = os.path.join(root, f'{prefix}-{n:03d}')
        try:
            os.makedirs(path)  # atomic: fails if another process took the name
            return path
        except FileExistsError:
            n += 1


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def png_info(settings: Optional[Mapping[str, Any]]):
    """PNG text metadata holding `settings` as JSON under the key 'vd_jax' (none if empty)."""
    # lazy: PIL (+41 ms)
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415
    info = PngInfo()
    if settings:
        info.add_text('vd_jax', json.dumps(settings, default=str))
    return info


def save_png(path: str, image: np.ndarray, settings: Optional[Mapping[str, Any]] = None) -> None:
    """One image (H, W, 3) in [0, 1]; the settings go into the PNG's text metadata too."""
    from PIL import Image  # noqa: PLC0415
    if os.path.exists(path):
        raise FileExistsError(f"refusing to overwrite '{path}'")
    Image.fromarray(to_uint8(image)).save(path, pnginfo=png_info(settings))


def make_grid(images: np.ndarray, cols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) -> one (rows*H, cols*W, 3) image with white padding."""
    images = np.asarray(images, np.float32)
    b, h, w, c = images.shape
    cols = cols or min(b, max(1, math.ceil(math.sqrt(b))))
    rows = math.ceil(b / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return grid


def code_version() -> str:
    """vd_jax version plus the git commit of the source tree, if it is a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return f"{__version__}+{rev.stdout.strip()}{'.dirty' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def write_results(out_dir: str, settings: Mapping[str, Any], images: Optional[np.ndarray] = None,
                  texts: Optional[Sequence[str]] = None, labels: Optional[Sequence[str]] = None,
                  inputs: Optional[np.ndarray] = None,
                  elsewhere: Optional[Mapping[str, Any]] = None) -> dict:
    """Write images (one PNG each + grid.png), texts (texts.json + texts.txt), and settings.json.

    elsewhere: {kind: path or [paths]} written by others (the other processes of a
    distributed run, previews), listed in settings.json with what this call writes.
    Returns {kind: [paths]} of what was written.
    """
    written = {'images': [], 'grid': None, 'texts': [], 'settings': None}
    if images is not None and len(images):
        for i, im in enumerate(images):
            p = os.path.join(out_dir, f'{i:04d}.png')
            save_png(p, im, dict(settings, index=i, label=labels[i] if labels else None))
            written['images'].append(p)
        grid_images = images if inputs is None else np.concatenate(
            [_fit(inputs, images.shape[1:3]), images])
        p = os.path.join(out_dir, 'grid.png')
        save_png(p, make_grid(grid_images), settings)
        written['grid'] = p
    if texts is not None:
        p = os.path.join(out_dir, 'texts.json')
        with open(p, 'x') as f:
            json.dump([{'index': i, 'input': labels[i] if labels else None, 'text': t}
                       for i, t in enumerate(texts)], f, indent=1)
        p2 = os.path.join(out_dir, 'texts.txt')
        with open(p2, 'x') as f:
            f.write('\n'.join(texts) + '\n')
        written['texts'] = [p, p2]
    listing = {k: v for k, v in written.items() if k != 'settings'}
    for k, v in (elsewhere or {}).items():
        if isinstance(v, (list, tuple)):
            listing[k] = list(v) + list(listing.get(k) or [])
        elif v is not None:
            listing[k] = v
    p = os.path.join(out_dir, 'settings.json')
    with open(p, 'x') as f:
        json.dump(dict(settings, written_at=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                       outputs=listing), f, indent=1, default=str)
    written['settings'] = p
    return written


def _fit(images: np.ndarray, hw) -> np.ndarray:
    """Resize input images to the output size for side-by-side grids (nearest is enough)."""
    out = []
    for im in images:
        ys = (np.arange(hw[0]) * im.shape[0] / hw[0]).astype(int)
        xs = (np.arange(hw[1]) * im.shape[1] / hw[1]).astype(int)
        out.append(im[ys][:, xs])
    return np.stack(out)


class LineProgress:
    """A progress display for logs (stderr not a terminal): whole lines only, no carriage
    returns or cursor escapes; one line when the count reaches the total and at most one
    every `every` seconds before. The subset of tqdm's interface the command lines use."""

    def __init__(self, total: int = 0, desc: str = '', unit: str = 'step', file=None,
                 every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.file = sys.stderr if file is None else file
        self.n, self._start, self._last = 0, time.time(), time.time()

    def reset(self, total: Optional[int] = None):
        self.n = 0
        self.total = self.total if total is None else total
        self._start = self._last = time.time()

    def set_description(self, desc: str):
        self.desc = desc

    def update(self, k: int = 1):
        self.n += k
        now = time.time()
        if (self.total and self.n >= self.total) or now - self._last >= self.every:
            self._last = now
            pct = f' ({100 * self.n // self.total}%)' if self.total else ''
            print(f'{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, '
                  f'{now - self._start:.1f}s', file=self.file, flush=True)

    def write(self, text: str):
        print(text, file=self.file, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(desc: str, unit: str = 'step', total: int = 0):
    """tqdm on a terminal; `LineProgress` elsewhere (a log file or a pipe would otherwise
    collect tqdm's carriage returns and escape codes)."""
    if stderr_is_tty():
        # lazy: tqdm (+24 ms)
        from tqdm import tqdm  # noqa: PLC0415
        return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr)
    return LineProgress(total=total, desc=desc, unit=unit)
