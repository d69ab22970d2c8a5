"""Resumable, deterministic sample generation for the metrics (`python -m vd_jax.eval fid|clip`).

Sample i of a run comes from input i mod P (prompt or source image; P inputs) with seed
`seed + i`, whatever the batch it is generated in, and is written (atomically) to
`<run>/samples/<i:06d>.png`. Run again on the same folder (`--resume DIR`), every sample
already there is reused and only the missing ones are generated, so an interrupted
30k-sample run continues where it stopped; metrics are always computed from the PNG files,
so a resumed run gives the same numbers as an uninterrupted one.

What decides sample i (the model, task, sampler, steps, spacing, Karras grid, scale, guidance
rescale, eta, seed, size, inputs) is recorded in `<run>/generation.json` and must match when
resuming; the batch size and the number of samples may change (a 1k-sample run can be
extended to 30k).

Prompts: a text file with one prompt per line (blank lines skipped), or a COCO captions
file (`captions_val2014.json`): one caption per image, the one with the lowest annotation id,
images in id order (`read_prompts`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from vd_jax.batching import batch_size_for, padded_batches
from vd_jax.errors import InputError
from vd_jax.outputs import png_info, to_uint8

SAMPLES = 'samples'
SPEC_FILE = 'generation.json'
TASKS = {'t2i': 'text_to_image', 'i2i': 'image_variation'}


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def read_prompts(path: str) -> List[str]:
    """Prompts from a text file (one per line) or a COCO captions JSON (see the module doc)."""
    if not os.path.isfile(path):
        raise InputError(f"prompt file '{path}' does not exist")
    if path.lower().endswith('.json'):
        return coco_captions(path)
    with open(path, encoding='utf-8') as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise InputError(f"prompt file '{path}' has no prompts (one per line)")
    return prompts


def coco_captions(path: str) -> List[str]:
    """One caption per image of a COCO captions file: for each image id (ascending) the
    caption of its lowest annotation id, whitespace collapsed."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        anns = data['annotations']
        best: Dict[int, tuple] = {}
        for a in anns:
            key = (int(a['id']), ' '.join(str(a['caption']).split()))
            img = int(a['image_id'])
            if img not in best or key < best[img]:
                best[img] = key
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"'{path}' is not a COCO captions file (annotations with "
                         f"image_id, id, caption): {type(e).__name__}: {e}") from None
    prompts = [best[i][1] for i in sorted(best)]
    if not prompts:
        raise InputError(f"COCO captions file '{path}' has no annotations")
    return prompts


def read_image_list(path: str) -> List[str]:
    """Image paths from a text file (one per line; relative paths are relative to the file)."""
    if not os.path.isfile(path):
        raise InputError(f"image list file '{path}' does not exist")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding='utf-8') as f:
        paths = [line.strip() for line in f if line.strip()]
    if not paths:
        raise InputError(f"image list file '{path}' has no image paths (one per line)")
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            raise InputError(f"image list '{path}', line {i + 1}: '{p}' does not exist")
    return paths


def inputs_digest(inputs: Sequence[str]) -> str:
    """sha256 of the input list (prompts or image paths), recorded to match on resume."""
    h = hashlib.sha256()
    for x in inputs:
        h.update(x.encode('utf-8') + b'\0')
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# What decides sample i
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Everything that decides sample i (`generation.json`). height/width None: the model's
    size; model: the checkpoint folder (absolute) or the shipped model name."""
    model: str
    task: str
    sampler: str
    steps: int
    scale: float
    eta: float
    seed: int
    height: Optional[int]
    width: Optional[int]
    dtype: str
    num_inputs: int
    inputs_sha256: str
    spacing: str = 'auto'
    karras: bool = False
    guidance_rescale: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mismatch(self, other: dict) -> List[str]:
        """'field: recorded X, now Y' for every field that differs from a recorded spec (a
        field a spec of an older version lacks counts as its default)."""
        mine = self.to_dict()
        was = {f.name: f.default for f in dataclasses.fields(self)
               if f.default is not dataclasses.MISSING}
        was.update(other)
        return [f'{k}: recorded {was.get(k)!r}, now {v!r}' for k, v in mine.items()
                if was.get(k) != v]


def check_resume(folder: str, spec: GenerationSpec) -> None:
    """A run folder to resume must hold a `generation.json` equal to `spec`."""
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.isdir(folder):
        raise InputError(f"--resume '{folder}' is not a folder")
    if not os.path.isfile(path):
        raise InputError(f"--resume '{folder}' is not an evaluation run folder (no "
                         f'{SPEC_FILE})')
    with open(path) as f:
        recorded = json.load(f)
    bad = spec.mismatch(recorded)
    if bad:
        raise InputError(f"--resume '{folder}' was generated with other settings ("
                         + '; '.join(bad) + '); use a new run folder')


def write_spec(folder: str, spec: GenerationSpec) -> None:
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.isfile(path):
        with open(path, 'w') as f:
            json.dump(spec.to_dict(), f, indent=1)


def sample_path(folder: str, i: int) -> str:
    return os.path.join(folder, SAMPLES, f'{i:06d}.png')


def sample_paths(folder: str, n: int) -> List[str]:
    return [sample_path(folder, i) for i in range(n)]


def missing_samples(folder: str, n: int) -> List[int]:
    return [i for i in range(n) if not os.path.isfile(sample_path(folder, i))]


def _save_png(path: str, image: np.ndarray, meta: dict) -> None:
    """Write atomically (temporary name, then rename): an interrupted write leaves no PNG
    that a resumed run would take for a finished sample."""
    # lazy: PIL (+12 ms)
    from PIL import Image  # noqa: PLC0415
    tmp = path + '.tmp'
    Image.fromarray(to_uint8(image)).save(tmp, format='PNG', pnginfo=png_info(meta))
    os.replace(tmp, path)


def generate(vd, spec: GenerationSpec, inputs: Sequence[str], n: int, folder: str,
             batch_size: int, log: Callable[[str], None] = print,
             progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Generate the samples 0..n-1 of `folder` that are not there yet.

    inputs: prompts (t2i) or source image paths (i2i); sample i uses inputs[i % P] and seed
    `spec.seed + i`. Every call runs a batch of min(batch_size, n) samples (the last padded
    with repeats whose outputs are dropped), so one compiled program serves the whole run.
    progress(k) is called after each batch with the samples written. Returns
    {'generated', 'reused', 'seconds'}.
    """
    if spec.task not in TASKS:
        raise InputError(f'task must be one of {sorted(TASKS)}, got {spec.task!r}')
    os.makedirs(os.path.join(folder, SAMPLES), exist_ok=True)
    write_spec(folder, spec)
    todo = missing_samples(folder, n)
    reused = n - len(todo)
    log(f'{folder}: {reused} of {n} samples already there (reused), {len(todo)} to generate')
    t0 = time.time()
    size = batch_size_for(n, batch_size)
    call = getattr(vd, TASKS[spec.task])
    kw = dict(steps=spec.steps, scale=spec.scale, sampler=spec.sampler, eta=spec.eta,
              spacing=spec.spacing, karras=spec.karras, guidance_rescale=spec.guidance_rescale,
              height=spec.height, width=spec.width)
    p = len(inputs)
    for batch in padded_batches(lambda i: inputs[i % p], todo, size, spec.seed):
        images = batch.trim(call(batch.inputs, 1, seed=batch.seed, **kw))
        for i, image in zip(batch.indices, images):
            _save_png(sample_path(folder, i), image,
                      {'index': i, 'seed': spec.seed + i, 'input': inputs[i % p],
                       'task': spec.task, 'model': spec.model})
        if progress:
            progress(len(batch.indices))
    return {'generated': len(todo), 'reused': reused, 'seconds': round(time.time() - t0, 2)}
