"""What a finished request leaves in the page: PNGs to show and one zip to download.

The zip is the same run folder `sample.py` writes (`vd_jax.outputs.write_results`): one PNG
per image with the settings in its text metadata, `grid.png`, `texts.json`/`texts.txt`
for text outputs and `settings.json`, plus the inputs under `inputs/`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vd_jax.outputs import to_uint8, write_results


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] (or uint8) -> PNG bytes, quantised as `sample.py` saves."""
    # lazy: PIL (+11 ms)
    from PIL import Image  # noqa: PLC0415
    a = image if image.dtype == np.uint8 else to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format='PNG')
    return buf.getvalue()


@dataclasses.dataclass
class Result:
    """One request's outputs and everything needed to reproduce them."""
    settings: Dict[str, Any]
    images: Optional[np.ndarray] = None        # (B, H, W, 3) in [0, 1]
    texts: Optional[List[str]] = None
    inputs: Sequence[np.ndarray] = ()           # uint8 (H, W, 3) input images, shown and zipped
    seconds: float = 0.0

    @functools.cached_property
    def pngs(self) -> List[bytes]:
        """The output images as PNG bytes (what the page shows)."""
        return [] if self.images is None else [png_bytes(im) for im in self.images]

    @functools.cached_property
    def zip(self) -> bytes:
        """The run folder as a zip (made once, on first download render)."""
        with tempfile.TemporaryDirectory(prefix='vd_demo_') as d:
            write_results(d, dict(self.settings, seconds=round(self.seconds, 2)),
                          images=self.images, texts=self.texts)
            for i, im in enumerate(self.inputs):
                os.makedirs(os.path.join(d, 'inputs'), exist_ok=True)
                with open(os.path.join(d, 'inputs', f'{i:02d}.png'), 'wb') as f:
                    f.write(png_bytes(np.asarray(im)))
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
                for root, _, files in os.walk(d):
                    for name in sorted(files):
                        path = os.path.join(root, name)
                        z.write(path, os.path.relpath(path, d))
            return buf.getvalue()
