"""The full-size four-flow model (3.7 B parameters, all five parts) end to end on this machine.

1. A child process writes a v1.0 checkpoint with random weights: every key and shape of the
   released four-flow file (`tests/data/vd_keys_fourflow.tsv`: diffuser, vae.image, vae.text,
   ctx.image, ctx.text), fp16 like the release, as one safetensors file written tensor by
   tensor.
2. `python -m vd_jax.convert` turns it into a vd_jax checkpoint folder (float32).
3. For each dtype (float32, bfloat16) and task (t2i, i2i, i2t, t2t, dual) a fresh child process
   loads the checkpoint (straight into the compute dtype) and runs the task through the
   pipeline at 512 px with 2 DDIM steps, timing: load, the first step (compile + run), the
   second step, the whole call; peak RSS (VmHWM) of the process.
4. bfloat16 vs float32 (same seed, same random weights, 256 px): the distance of one
   diffuser forward (the eps prediction), of the latents after one guided text->image step
   and after 50 steps.

    python benchmarks/bench_fullsize.py [--workdir /tmp/vd_fullsize] [--smoke]

`--smoke` runs the same code on the tiny config (CI), each task once, the two dtypes taking
turns, all five in one child process (a process's start-up is the smoke run's cost, and no
number of it is compared; its peak RSS is then the largest so far, not the task's own).
The full run needs ~21 GB of disk (the float16 source and the float32 checkpoint), 20 GiB
of RAM and ~18 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TASKS = ('t2i', 'i2i', 'i2t', 't2t', 'dual')
DTYPES = ('float32', 'bfloat16')


def write_source(path: str, smoke: bool) -> dict:
    """The random v1.0 checkpoint (child process): every key of the listing (or, smoke: the
    tiny model exported to v1.0 names)."""
    import numpy as np
    from vd_jax.checkpoint import SafetensorsWriter
    t0 = time.perf_counter()
    if smoke:
        from vd_jax.convert import export_part
        from vd_jax.pipeline import VersatileDiffusion
        vd = VersatileDiffusion.random('tiny')
        entries = {}
        for part, params in vd.params.items():
            entries.update(export_part(params, vd.config, part, 'vd-v1.0'))
        items = [(k, v.shape, np.float16) for k, v in entries.items()]
        get = (lambda k: entries[k])
    else:
        rows = []
        with open(os.path.join(common.REPO, 'tests', 'data', 'vd_keys_fourflow.tsv')) as f:
            for line in f:
                if line.startswith(('#', 'key\t')):
                    continue
                key, shape, _dtype, kind, _group = line.rstrip('\n').split('\t')
                if kind == 'buffer' or 'position_ids' in key:
                    continue  # the schedule buffers and CLIP's position ids are not weights
                rows.append((key, tuple(int(s) for s in shape.split(',') if s)))
        items = [(k, s, np.float16) for k, s in rows]
        shapes = dict(rows)
        # GPT-2's lm_head is a tied copy of its token embedding (the converter checks it)
        from vd_jax.convert.optimus_rules import TIED
        copy_of = {k: k[:-len(TIED[0])] + TIED[1] for k in shapes if k.endswith(TIED[0])}

        def get(k):  # small random values keep every activation finite; seeded by name
            src = copy_of.get(k, k)
            r = np.random.default_rng(zlib.crc32(src.encode()))
            return (r.standard_normal(shapes[src], dtype=np.float32) * 0.02).astype(np.float16)
    w = SafetensorsWriter(path, items)
    n = 0
    for k, shape, _ in items:
        v = get(k)
        n += int(np.prod(shape))
        w.write(k, v)
    w.close()
    return dict(path=path, keys=len(items), params=n, file_bytes=os.path.getsize(path),
                write_s=round(time.perf_counter() - t0, 1))


_COMPILE_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
                   '/jax/core/compile/backend_compile_duration': 'backend'}
_compile_s: dict = {}   # JAX's compile seconds by part since the current task began


def _count_compiles() -> dict:
    """Listen to JAX's compile events (once per process); zero and return the counts."""
    import jax
    if not _compile_s:
        def on_event(name, secs, **_):
            if name in _COMPILE_EVENTS:
                _compile_s[_COMPILE_EVENTS[name]] += secs
        jax.monitoring.register_event_duration_secs_listener(on_event)
    _compile_s.update(trace=0.0, lower=0.0, backend=0.0)
    return _compile_s


def run_task(ckpt: str, task: str, dtype: str, smoke: bool) -> dict:
    """Load + one task at 512 px (smoke: the tiny size), 2 steps (the full run: in a fresh
    process). Compile time is JAX's own count (trace + lowering + XLA backend compile events);
    memory is sampled every 50 ms as anonymous (what the process holds: the weights) and
    file-backed (pages of the memory-mapped checkpoint, which the kernel may drop) resident
    memory."""
    import numpy as np
    import jax
    from vd_jax.pipeline import VersatileDiffusion
    compile_s = _count_compiles()
    common.reset_peak()
    with common.MemSampler() as ms:
        t0 = time.perf_counter()
        vd = VersatileDiffusion.from_checkpoint(ckpt, dtype=dtype)
        jax.block_until_ready(vd.params)
        t_load = time.perf_counter() - t0
        after_load = common.rss()
        compile_load = sum(compile_s.values())
        size = vd.components.image_size
        img = np.random.default_rng(0).uniform(size=(size, size, 3)).astype(np.float32)
        marks = []
        kw = dict(steps=2, seed=0, callback=lambda i, z: marks.append(
            (i, time.perf_counter(), float(np.asarray(z).std()))))
        t0 = time.perf_counter()
        if task == 't2i':
            out = vd.text_to_image('a red bicycle', 1, **kw)
        elif task == 'i2i':
            out = vd.image_variation(img, 1, **kw)
        elif task == 'i2t':
            out = vd.image_to_text(img, 1, **kw)
        elif task == 't2t':
            out = vd.text_variation('a cat sits on a mat', 1, **kw)
        else:
            out = vd.dual_guided('a red bicycle', img, 1, mix=0.5, **kw)
        t_total = time.perf_counter() - t0
    first = marks[0][1] - t0 if marks else None
    second = marks[1][1] - marks[0][1] if len(marks) > 1 else None
    return dict(task=task, dtype=dtype, size=size, load_s=round(t_load, 1),
                compile_s=round(sum(compile_s.values()) - compile_load, 1),
                compile_parts_s={k: round(v, 2) for k, v in compile_s.items()},
                first_step_s=round(first, 1), second_step_s=round(second, 2),
                total_s=round(t_total, 1), peak_rss=common.peak_rss(),
                peak_anon=ms.peak['anon'], peak_file=ms.peak['file'],
                anon_after_load=after_load['anon'],
                finite=bool(all(np.isfinite(m[2]) for m in marks)),
                output=(str(out[0])[:80] if isinstance(out, list) else list(np.shape(out))))


def bf16_distance(ckpt: str, steps: int, size: Optional[int]) -> dict:
    """float32 vs bfloat16 text->image latents (same seed), one step and `steps` steps, at
    `size` px: the full-width model (every channel of every layer), at a resolution that keeps
    50 bfloat16 steps affordable on a CPU (XLA's CPU bfloat16 is emulated, ~5x float32)."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    from vd_jax.diffusion.conditioning import Single
    from vd_jax.pipeline import VersatileDiffusion
    out, hw = {}, (dict(height=size, width=size) if size else {})
    # one diffuser forward (the eps prediction a sampler step uses) on the same input: the
    # per-step cost of bfloat16, free of the sampler's float32 arithmetic around it
    eps = {}
    for dtype in DTYPES:
        vd = VersatileDiffusion.from_checkpoint(ckpt, dtype=dtype, parts=['diffuser', 'ctx_text'])
        comps = vd.components
        ctx = comps.encode_context('text', ['a red bicycle'])
        side = size or comps.image_size
        shape = comps.latent_shape('image', 1, (side, side))
        x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
        fn = jax.jit(Single(comps.module('diffuser'), 'image', 'text'))
        eps[dtype] = np.asarray(fn(comps.params['diffuser'], x, jnp.asarray([500]), ctx),
                                np.float32)
        del vd, comps
    d = eps['float32'] - eps['bfloat16']
    out['eps_one_forward'] = dict(
        max_abs=float(np.abs(d).max()), max_abs_eps=float(np.abs(eps['float32']).max()),
        std_eps=float(eps['float32'].std()),
        relative_l2=float(np.linalg.norm(d) / np.linalg.norm(eps['float32'])))
    for n in (1, steps):
        lat = {}
        for dtype in DTYPES:
            vd = VersatileDiffusion.from_checkpoint(ckpt, dtype=dtype, parts=['diffuser',
                                                                           'ctx_text', 'vae_image'])
            cap = []
            vd.text_to_image('a red bicycle', 1, steps=n, seed=0, **hw,
                             callback=lambda i, z, cap=cap: cap.append(np.asarray(z)))
            lat[dtype] = cap[-1]
            del vd
        d = np.abs(lat['float32'] - lat['bfloat16'])
        scale = float(np.abs(lat['float32']).max())
        out[f'{n}_steps'] = dict(max_abs=float(d.max()), mean_abs=float(d.mean()),
                                 max_abs_latent=scale, relative=float(d.max() / scale))
    out['size'] = size
    return out


def task_runs(smoke: bool) -> list:
    """(dtype, task) of each child: every pair; smoke, every task once in alternating dtypes."""
    if smoke:
        return [(DTYPES[i % len(DTYPES)], task) for i, task in enumerate(TASKS)]
    return [(dtype, task) for dtype in DTYPES for task in TASKS]


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--workdir', default='/tmp/vd_fullsize')
    ap.add_argument('--child', choices=['write', 'tasks', 'bf16'], help=argparse_hidden())
    ap.add_argument('--runs', help=argparse_hidden())   # DTYPE:TASK,DTYPE:TASK,...
    ap.add_argument('--bf16-steps', type=int, default=None)
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    smoke = args.smoke
    work = os.path.join(args.workdir, 'smoke' if smoke else 'full')
    src, ckpt = os.path.join(work, 'vd4-random-fp16.safetensors'), os.path.join(work, 'vd4')
    if args.child == 'write':
        print(json.dumps(write_source(src, smoke)))
        return
    if args.child == 'tasks':
        runs = [r.split(':') for r in args.runs.split(',')]
        print(json.dumps({'result': [run_task(ckpt, task, dtype, smoke) for dtype, task in runs]}))
        return
    if args.child == 'bf16':
        print(json.dumps(bf16_distance(ckpt, args.bf16_steps, None if smoke else 256)))
        return
    log = print
    os.makedirs(work, exist_ok=True)
    me = [os.path.abspath(__file__)] + (['--smoke'] if smoke else []) + ['--workdir', args.workdir]
    rec = dict(machine=common.machine_info(), smoke=smoke)
    if not os.path.isfile(src):
        log('== write the random v1.0 checkpoint (all five parts)')
        rec['source'] = common.run_child(me + ['--child', 'write'])
    if not os.path.isdir(ckpt):
        log('== convert it (float32)')
        t0 = time.perf_counter()
        import subprocess
        subprocess.run([sys.executable, '-m', 'vd_jax.convert', src, ckpt, '--config',
                        'vd_four_flow:tiny' if smoke else 'vd_four_flow'], check=True,
                       cwd=common.REPO)
        rec['convert_s'] = round(time.perf_counter() - t0, 1)
    prev = os.path.join(args.out, f"bench_fullsize{'-smoke' if smoke else ''}.json")
    if os.path.isfile(prev) and 'source' not in rec:  # files kept from the run that made them
        with open(prev) as f:
            old = json.load(f)
        rec.update({k: old[k] for k in ('source', 'convert_s') if k in old})
    rows, rec['runs'] = [], []
    # the full run: every task in a fresh process (its own peak memory); smoke: one process
    children = [task_runs(smoke)] if smoke else [[run] for run in task_runs(smoke)]
    for runs in children:
        log('== ' + ', '.join(f'{task} {dtype}' for dtype, task in runs))
        out = common.run_child(me + ['--child', 'tasks', '--runs',
                                     ','.join(f'{d}:{t}' for d, t in runs)])
        rec['runs'] += [dict(r, child_wall_s=out['child_wall_s']) for r in out['result']]
    for r in rec['runs']:
        rows.append([r['task'], r['dtype'], f"{common.gib(r['peak_rss']):.1f}",
                     f"{common.gib(r['peak_anon']):.1f}", r['load_s'], r['compile_s'],
                     r['first_step_s'], r['second_step_s'], r['total_s']])
    log(common.table(['task', 'dtype', 'peak RSS GiB', 'peak anon GiB', 'load s', 'compile s',
                      'first step s (with compile)', 'step s', 'call s'], rows))
    steps = args.bf16_steps or (4 if smoke else 50)
    log(f'== bfloat16 vs float32 latents (1 and {steps} steps)')
    rec['bf16_distance'] = common.run_child(me + ['--child', 'bf16', '--bf16-steps', str(steps)])
    log(json.dumps(rec['bf16_distance'], indent=1))
    common.write_record('bench_fullsize', rec, args.out, smoke)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__':
    main()
