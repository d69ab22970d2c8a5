"""Converting a full-size checkpoint: time and peak memory relative to the file's size.

1. A child process writes a synthetic fp16 checkpoint of the whole four-flow diffuser
   (2,566,318,852 parameters, plus the 12 schedule buffers) in the original v1.0 layout,
   every key and shape taken from `tests/data/vd_keys_fourflow.tsv`, random values
   (`--smoke`: the tiny four-flow diffuser, exported with `vd_jax.convert.export_part`).
2. A fresh child process converts it with `vd_jax.convert.convert_checkpoint` to a float32
   vd_jax checkpoint (the default CLI path), sampling its memory every 50 ms.

Reported: conversion wall time and throughput, peak RSS (kernel VmHWM) and its split into
anonymous memory (what the converter really holds) and file-backed pages (the memory-mapped
source: page cache the kernel can drop, but counted in RSS), each relative to the source
file's size. The file was just written, so it is read from a warm page cache.

  python benchmarks/bench_convert.py                  # ~5 GB source, ~10 GB output in --workdir
  python benchmarks/bench_convert.py --smoke
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TSV = os.path.join(common.REPO, 'tests', 'data', 'vd_keys_fourflow.tsv')
DIFFUSER_GROUPS = ('global(', 'data(', 'context(')


def tsv_entries(path: str = TSV):
    """(key, shape) of the diffuser parameters and schedule buffers of the four-flow file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"key listing '{path}' not found (pass --tsv)")
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith('#') or line.startswith('key\t'):
                continue
            key, shape, _dtype, _kind, group = line.rstrip('\n').split('\t')
            if group.startswith(DIFFUSER_GROUPS) or group == 'schedule-buffer':
                out.append((key, tuple(int(s) for s in shape.split(',') if s)))
    return out


def generate(path: str, smoke: bool, tsv: str) -> dict:
    """Write the synthetic fp16 checkpoint (child process)."""
    import numpy as np
    import torch
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if smoke:
        from vd_jax.config import load_config
        from vd_jax.convert import export_part
        from vd_jax.models.init import random_params
        from vd_jax.models.init import abstract_params
        from vd_jax.models.unet import Diffuser
        cfg = load_config('vd_four_flow:tiny').model
        params = random_params(abstract_params(Diffuser(cfg.diffuser)))
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)).half()
              for k, v in export_part(params, cfg, 'diffuser', 'vd-v1.0').items()}
        sd['betas'] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    else:
        sd = {}
        for key, shape in tsv_entries(tsv):
            if '.' not in key:  # schedule buffer: keep f32 like the released file's buffers
                sd[key] = torch.randn(shape)
            else:
                sd[key] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02)
    n = sum(v.numel() for k, v in sd.items() if k.startswith('diffuser.'))
    t_gen = time.perf_counter() - t0
    torch.save(sd, path)
    return dict(path=path, keys=len(sd), diffuser_params=n, file_bytes=os.path.getsize(path),
                generate_s=t_gen, save_s=time.perf_counter() - t0 - t_gen)


def convert(src: str, out: str, config: str) -> dict:
    """Convert in this (fresh) process; report time and memory."""
    from vd_jax.convert import convert_checkpoint
    r0 = common.rss()
    common.reset_peak()
    with common.MemSampler() as ms:
        t0 = time.perf_counter()
        convert_checkpoint(src, config, out=out)
        t = time.perf_counter() - t0
    out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    with open(os.path.join(out, 'manifest.json')) as f:
        man = json.load(f)
    return dict(convert_s=t, out_bytes=out_bytes, rss_before=r0['rss'], peak_rss=common.peak_rss(),
                peak_anon=ms.peak['anon'], peak_file=ms.peak['file'],
                params=man['parts']['diffuser']['params'], layout=man['layout'],
                ignored=len(man['ignored_keys']))


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--workdir', default='/tmp/vd_bench_convert', help='where the files go')
    ap.add_argument('--keep', action='store_true', help='keep the generated files')
    ap.add_argument('--tsv', default=TSV, help='key listing of the four-flow checkpoint')
    ap.add_argument('--generate', metavar='PATH', help=argparse_hidden())
    ap.add_argument('--convert', nargs=2, metavar=('SRC', 'OUT'), help=argparse_hidden())
    args = ap.parse_args(argv)
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    config = 'vd_four_flow:tiny' if args.smoke else 'vd_four_flow'
    if args.generate:
        print(json.dumps(generate(args.generate, args.smoke, args.tsv)))
        return
    if args.convert:
        print(json.dumps(convert(*args.convert, config)))
        return

    rec = dict(benchmark='convert_checkpoint', args=vars(args), machine=common.machine_info())
    work = os.path.join(args.workdir, 'smoke' if args.smoke else 'full')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src, out = os.path.join(work, 'vd-four-flow-synthetic-fp16.pth'), os.path.join(work, 'converted')
    me = os.path.abspath(__file__)
    flag = ['--smoke'] if args.smoke else []
    try:
        if not args.smoke:
            from vd_jax.config import load_config
            from vd_jax.convert.diffuser_rules import diffuser_rows
            from vd_jax.models.unet import DiffuserConfig
            rows = {r.canonical for r in diffuser_rows(DiffuserConfig.from_dict(
                load_config(config).model.diffuser))}
            keys = {k for k, _ in tsv_entries(args.tsv) if '.' in k}
            rec['tsv_keys_equal_converter_rows'] = rows == keys
            print(f'  tsv diffuser keys {len(keys)}, converter rows {len(rows)}, equal: {rows == keys}')
        print('== generate the synthetic fp16 checkpoint (child process)')
        gen = common.run_child([me, '--generate', src, '--tsv', args.tsv] + flag)
        print(f"  {gen['keys']} keys, {gen['diffuser_params']:,} diffuser params, "
              f"{gen['file_bytes'] / 2**30:.2f} GiB; generate {gen['generate_s']:.1f}s, "
              f"save {gen['save_s']:.1f}s")
        print('== convert it (fresh child process)')
        cv = common.run_child([me, '--convert', src, out] + flag)
        fb = gen['file_bytes']
        res = dict(file_gib=common.gib(fb), out_gib=common.gib(cv['out_bytes']),
                   convert_s=cv['convert_s'], child_wall_s=cv['child_wall_s'],
                   read_mb_s=fb / cv['convert_s'] / 1e6, write_mb_s=cv['out_bytes'] / cv['convert_s'] / 1e6,
                   peak_rss_gib=common.gib(cv['peak_rss']), peak_anon_gib=common.gib(cv['peak_anon']),
                   peak_file_gib=common.gib(cv['peak_file']),
                   rss_before_gib=common.gib(cv['rss_before']),
                   peak_rss_over_file=cv['peak_rss'] / fb,
                   peak_anon_over_file=cv['peak_anon'] / fb,
                   peak_rss_growth_over_file=(cv['peak_rss'] - cv['rss_before']) / fb,
                   params=cv['params'], layout=cv['layout'], ignored_keys=cv['ignored'])
        rec['generate'], rec['convert'] = gen, res
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    common.write_record('bench_convert', rec, args.out, args.smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    r = rec['convert']
    print('\nConverting the four-flow diffuser (fp16 v1.0 .pth -> float32 vd_jax safetensors; '
          'memory of the converting process)\n' +
          common.table(['source GiB', 'output GiB', 'time s', 'read MB/s', 'peak RSS GiB (x file)',
                        'peak anon GiB (x file)', 'peak file-backed GiB', 'RSS before GiB'],
                       [(r['file_gib'], r['out_gib'], f"{r['convert_s']:.1f}", f"{r['read_mb_s']:.0f}",
                         f"{r['peak_rss_gib']:.2f} ({r['peak_rss_over_file']:.2f}x)",
                         f"{r['peak_anon_gib']:.2f} ({r['peak_anon_over_file']:.2f}x)",
                         f"{r['peak_file_gib']:.2f}", f"{r['rss_before_gib']:.2f}")]))


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == '__main__':
    main()
