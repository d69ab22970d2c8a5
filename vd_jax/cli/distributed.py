"""sample.py on several processes (`--distributed`) and its device mesh (`--mesh`).

Every process samples its share of the inputs on a mesh of its own devices and writes its
files, named by global sample index, into the one run folder process 0 made
(`shared_run_dir`); process 0 then merges the shares (`merge_shares`). JAX is imported inside
the functions: sample.py reports usage errors before it loads (~5 s on a 2-core CPU host).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

from vd_jax.errors import InputError
from vd_jax.outputs import make_grid, new_run_dir, save_png, write_results


def check_parallel(args) -> None:
    """--mesh, --distributed and its companions, --preview-every, --start-step."""
    if args.mesh is not None and args.mesh.lower() != 'none':
        # lazy: vd_jax.pipeline pulls in jax, flax (+1.6 s)
        from vd_jax.pipeline import parse_mesh  # noqa: PLC0415
        try:
            parse_mesh(args.mesh)
        except ValueError as e:
            raise InputError(f'--mesh: {e}') from None
    given = [f for f in ('coordinator', 'num_processes', 'process_id')
             if getattr(args, f) is not None]
    if given and not args.distributed:
        raise InputError(f"--{given[0]} needs --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        raise InputError(f'--num_processes {args.num_processes} must be >= 1')
    if args.process_id is not None and not (
            0 <= args.process_id < (args.num_processes or args.process_id + 1)):
        raise InputError(f'--process_id {args.process_id} must be in [0, --num_processes)')
    if args.preview_every is not None and args.preview_every < 1:
        raise InputError(f'--preview-every {args.preview_every} must be >= 1')
    if args.start_step is not None:
        if args.start_step < 0:
            raise InputError(f'--start-step {args.start_step} must be >= 0')
        if args.fidelity:
            raise InputError('give --fidelity or --start-step, not both')


def start_processes(args) -> Tuple[int, int]:
    """--distributed: jax.distributed.initialize (as train.py; CPU collectives over gloo).
    Returns (process index, process count)."""
    # lazy: jax (+1.2 s)
    import jax  # noqa: PLC0415
    if not args.distributed:
        return 0, 1
    if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
        # CPU devices of different processes need a collectives backend (the barrier and the
        # run folder's broadcast); harmless on TPU/GPU hosts, where it only concerns the CPU
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    return jax.process_index(), jax.process_count()


def make_mesh(args):
    """The mesh of this process's devices (`--mesh`; default data=-1 over several devices)."""
    import jax  # noqa: PLC0415
    spec = args.mesh
    if spec is None:
        spec = 'data=-1' if jax.local_device_count() > 1 else 'none'
    if spec.lower() == 'none':
        return None
    from vd_jax.pipeline import as_mesh  # noqa: PLC0415
    return as_mesh(spec)


def shared_run_dir(root: str, share: Tuple[int, int]) -> str:
    """One new run folder for all processes: process 0 creates it, the others learn its path
    (a broadcast over the processes' devices)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415
    path = new_run_dir(root) if share[0] == 0 else ''
    raw = np.zeros(4096, np.uint8)
    data = os.path.abspath(path).encode() if path else b''
    raw[:len(data)] = np.frombuffer(data, np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw != 0]).decode()


def write_share(out_dir, settings, share, result) -> None:
    """Every process: its images (of a `SampleResult`) as <global index>.png and a part
    record (labels, texts, files) for process 0 to merge."""
    files = []
    for i, gi in enumerate(result.index):
        if result.images is not None:
            p = os.path.join(out_dir, f'{gi:04d}.png')
            save_png(p, result.images[i], dict(settings, index=gi, label=result.labels[i]))
            files.append(p)
    with open(os.path.join(out_dir, f'part-{share[0]:03d}.json'), 'x') as f:
        json.dump({'index': result.index, 'labels': result.labels, 'texts': result.texts,
                   'images': files}, f)


def merge_shares(out_dir, settings, share, inputs) -> Tuple[dict, Optional[list]]:
    """Process 0 after every process wrote its share: grid.png, texts.json/texts.txt and the
    one settings.json listing every output. Returns (the outputs {kind: paths}, all
    sentences or None); inputs(hw) -> the input image for the grid, or None."""
    # lazy: PIL (+8 ms)
    from PIL import Image  # noqa: PLC0415
    index, labels, texts, files = [], [], [], []
    for k in range(share[1]):
        part = os.path.join(out_dir, f'part-{k:03d}.json')
        with open(part) as f:
            rec = json.load(f)
        index += rec['index']
        labels += rec['labels']
        texts += rec['texts'] or []
        files += rec['images']
        os.remove(part)
    order = np.argsort(index, kind='stable')
    labels = [labels[i] for i in order]
    grid = None
    if files:
        files = [files[i] for i in order]
        ims = np.stack([np.asarray(Image.open(p).convert('RGB'), np.float32) / 255.0
                        for p in files])
        grid = os.path.join(out_dir, 'grid.png')
        save_png(grid, make_grid(ims if inputs is None else np.concatenate(
            [inputs(ims.shape[1:3]), ims])), settings)
    texts = [texts[i] for i in order] if texts else None
    previews = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                      if f.startswith('preview_'))
    written = write_results(out_dir, settings, texts=texts, labels=labels,
                            elsewhere={'images': files, 'grid': grid, 'previews': previews})
    return dict(written, images=files, grid=grid), texts
