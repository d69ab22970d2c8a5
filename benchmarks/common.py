"""Shared pieces of the benchmark scripts: environment record, timing, memory, GEMM peak,
FLOP counting, tables and JSON records.

Nothing here imports jax or torch at module level: scripts set `XLA_FLAGS` / thread counts
first (`setup`), and JAX reads its flags once, when its backend starts.

Timing method (every script): build, warm up (the first JAX call compiles), then time
`reps` calls; PyTorch and JAX are timed **interleaved in one process** (ABBA order per
repetition, so slow drifts of this shared VM hit both sides alike), and the ratio of the
medians is reported with min/max of each side. Peak memory is read from the kernel
(`VmHWM`, resettable per phase via `/proc/self/clear_refs`) and split into anonymous and
file-backed pages, because memory-mapped checkpoint pages count in RSS but are page cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results')


# ----------------------------------------------------------------------------------------
# Set-up and the environment record
# ----------------------------------------------------------------------------------------

def parse_pair(text: str, flag: str) -> Tuple[int, int]:
    """'AxB' (a command-line value such as a block size or a shape) -> (A, B), positive
    integers; anything else exits with an error naming `flag`."""
    try:
        a, b = (int(x) for x in text.lower().split('x'))
    except ValueError:
        raise SystemExit(f'error: {flag} takes AxB with two integers, got {text!r}') from None
    if a < 1 or b < 1:
        raise SystemExit(f'error: {flag} sizes must be positive, got {text!r}')
    return a, b


def setup(threads: int = 2, xla_flags: Optional[str] = None, jaxlib_defaults: bool = False) -> None:
    """Offline, CPU-only, `threads` intra-op threads for torch; XLA flags (before jax starts).

    By default JAX runs as vd_jax ships it: `vd_jax.platform.configure_xla()` adds the CPU
    flags sample.py and train.py apply. `jaxlib_defaults=True` (`--xla-default`) measures
    jaxlib's own defaults instead; child processes inherit the choice through the environment.
    Call before importing jax/torch-using modules."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    if jaxlib_defaults:
        os.environ['VD_JAX_KEEP_XLA_FLAGS'] = '1'
    if xla_flags:
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
    if 'jax' in sys.modules and (xla_flags or not os.environ.get('VD_JAX_KEEP_XLA_FLAGS')):
        raise RuntimeError('common.setup() must run before jax is imported (XLA reads its flags once)')
    from vd_jax.platform import configure_xla
    configure_xla()
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--smoke', action='store_true',
                   help='tiny config, 1 repetition: proves the script runs (CI)')
    p.add_argument('--out', default=RESULTS, help='folder for the JSON record')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads (XLA uses all cores)')
    p.add_argument('--xla-default', action='store_true',
                   help="jaxlib's default XLA flags instead of the CPU flags vd_jax applies "
                        '(vd_jax.platform.configure_xla)')
    p.add_argument('--warmup', type=int, default=None, help='warm-up calls per side')
    p.add_argument('--reps', type=int, default=None, help='timed calls per side')
    p.add_argument('--tag', default='', help='suffix of the record name (e.g. the flags tried)')
    return p


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


# Which microarchitecture a CPU is, from /proc/cpuinfo's vendor, family and model (the model
# name on a VM often says only 'AMD EPYC'). AMD's family/model ranges are those of the Linux
# kernel's amd_zen*/x86 model tables and AMD's processor programming references: family 17h
# (23) is Zen/Zen+/Zen 2, 19h (25) is Zen 3 (models 00-0F, 20-2F, 40-5F) or Zen 4 (10-1F,
# 60-7F, A0-AF), 1Ah (26) is Zen 5. Results differ by kind (Zen 5's XLA GEMM runs twice Zen 4's
# on the same 2 vCPUs), so records are compared only within one kind.
_AMD_KINDS = {23: ((0x00, 0xFF, 'Zen/Zen+/Zen 2'),),
              25: ((0x00, 0x0F, 'Zen 3'), (0x10, 0x1F, 'Zen 4'), (0x20, 0x2F, 'Zen 3'),
                   (0x40, 0x5F, 'Zen 3'), (0x60, 0x7F, 'Zen 4'), (0xA0, 0xAF, 'Zen 4')),
              26: ((0x00, 0xFF, 'Zen 5'),)}
# the ISA extensions that decide which kernels XLA, oneDNN and MKL pick
_ISA_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512dq', 'avx512bw',
              'avx512vl', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'avx_vnni', 'amx_tile',
              'amx_bf16', 'amx_int8')


def cpu_id(path: str = '/proc/cpuinfo') -> Dict[str, object]:
    """The first CPU's vendor, family, model and stepping (integers) and its model name, read
    from /proc/cpuinfo ({} where it cannot be read)."""
    out: Dict[str, object] = {}
    keys = {'vendor_id': 'vendor', 'cpu family': 'family', 'model': 'model',
            'stepping': 'stepping', 'model name': 'model_name'}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor only
                key, _, value = line.partition(':')
                name = keys.get(key.strip())
                if name and name not in out:
                    value = value.strip()
                    out[name] = int(value) if name in ('family', 'model', 'stepping') \
                        and value.isdigit() else value
    except OSError:
        pass
    return out


def host_kind(cpu: Mapping[str, object]) -> str:
    """'Zen 4', 'Zen 5', ... for AMD CPUs by family and model (`_AMD_KINDS`); otherwise
    '<vendor> family F model M' (or 'unknown'): the label records are grouped by."""
    family, model = cpu.get('family'), cpu.get('model')
    if cpu.get('vendor') == 'AuthenticAMD' and isinstance(family, int) and isinstance(model, int):
        for lo, hi, kind in _AMD_KINDS.get(family, ()):
            if lo <= model <= hi:
                return kind
    if family is None or model is None:
        return 'unknown'
    return f"{cpu.get('vendor', '?')} family {family} model {model}"


def _cpu_flags() -> List[str]:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    fl = set(line.split(':', 1)[1].split())
                    return [x for x in _ISA_FLAGS if x in fl]
    except OSError:
        pass
    return []


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', '-C', REPO, 'status', '--porcelain'],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ('+dirty' if dirty else '') if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    """CPU, memory, library versions, threads and flags: the header of every record."""
    cpu = cpu_id()
    info = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        cpu=_cpu_model(), cpu_id=cpu, host_kind=host_kind(cpu), cpu_flags=_cpu_flags(),
        cores=os.cpu_count(),
        mem_total_gib=round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
        python=platform.python_version(),
        versions={m: _version(m) for m in ('jax', 'jaxlib', 'flax', 'numpy', 'torch',
                                            'diffusers', 'transformers', 'optax')},
        env={k: os.environ.get(k) for k in ('XLA_FLAGS', 'VD_JAX_KEEP_XLA_FLAGS', 'JAX_PLATFORMS',
                                            'OMP_NUM_THREADS', 'MKL_NUM_THREADS',
                                            'OPENBLAS_NUM_THREADS')
             if os.environ.get(k)},
        loadavg_at_start=os.getloadavg(),
        git=_git_commit(),
    )
    if 'torch' in sys.modules:
        import torch
        info['torch_threads'] = torch.get_num_threads()
        info['torch_interop_threads'] = torch.get_num_interop_threads()
    if 'jax' in sys.modules:
        import jax
        info['jax_devices'] = [str(d) for d in jax.devices()]
        info['jax_default_matmul_precision'] = jax.config.jax_default_matmul_precision
    return info


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------

def stats(ts: Sequence[float]) -> dict:
    """Median, min, max and all values (seconds)."""
    ts = list(ts)
    return dict(median=statistics.median(ts), min=min(ts), max=max(ts), n=len(ts),
                all=[round(t, 6) for t in ts])


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call; fn must block until its result is ready."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1,
                log: Callable[[str], None] = print) -> Dict[str, dict]:
    """Time several callables side by side: `warmup` untimed calls each, then `reps` rounds
    in which every callable runs once, alternating the order (ABBA...) so that drifts of a
    shared machine affect every side alike. Returns {name: stats}."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            t = timed(fns[name])
            log(f'  warm-up {name} #{i + 1}: {t:.3f} s')
    times: Dict[str, List[float]] = {n: [] for n in names}
    loads = []
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(fns[name]))
        loads.append(os.getloadavg()[0])
        log('  rep %d: ' % (r + 1) + ', '.join(f'{n} {times[n][-1]:.3f} s' for n in names) +
            f' (load {loads[-1]:.2f})')
    out = {n: stats(t) for n, t in times.items()}
    for st in out.values():
        st['load1_during'] = loads  # 1-min load average after each round (noise indicator)
    return out


def wait_for_quiet(max_load: float, timeout: float = 3600, poll: float = 30,
                   log: Callable[[str], None] = print) -> float:
    """Block until the 1-minute load average is below `max_load` (or `timeout` s passed);
    return the load seen. Benchmarks on a shared machine mean nothing under load."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 > timeout:
            if load >= max_load:
                log(f'  load {load:.2f} still >= {max_load} after {timeout:.0f}s: running anyway')
            return load
        log(f'  waiting for a quiet machine: load {load:.2f} >= {max_load}')
        time.sleep(poll)


def block(x):
    """Block on every JAX array in a pytree (timing needs the result, not the dispatch)."""
    import jax
    return jax.block_until_ready(x)


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------

def _status() -> Dict[str, int]:
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile', 'RssShmem'):
                out[k] = int(v.split()[0]) * 1024
    return out


def rss() -> Dict[str, int]:
    """Current resident memory in bytes: rss, anon, file, and the peak `hwm` since the last
    `reset_peak` (or process start)."""
    s = _status()
    return dict(rss=s.get('VmRSS', 0), anon=s.get('RssAnon', 0), file=s.get('RssFile', 0),
                hwm=s.get('VmHWM', 0))


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not allowed."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS of this process (kernel VmHWM, bytes) since start or the last `reset_peak`.

    Not `getrusage().ru_maxrss`: a child started by fork+exec inherits its parent's maximum
    in that counter, so a small child of a big parent would report the parent's peak."""
    return rss()['hwm']


class MemSampler:
    """Polls /proc/self/status in a thread: the peaks of anonymous and file-backed RSS (the
    kernel's VmHWM has only their sum)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = dict(rss=0, anon=0, file=0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            r = rss()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], r[k])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        r = rss()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], r[k])


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


# ----------------------------------------------------------------------------------------
# FLOPs and the matmul peak
# ----------------------------------------------------------------------------------------

def register_cpu_sdpa_flops() -> None:
    """torch's FlopCounterMode has no formula for the CPU SDPA kernel
    (`aten._scaled_dot_product_flash_attention_for_cpu`, what `AttnProcessor2_0` runs on CPU),
    so the attention core would count 0. Register torch's own SDPA formula
    (QK^T + AV = 4 B H Sq Sk D) for it."""
    import torch
    from torch.utils import flop_counter as fc
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in fc.flop_registry and op.default not in fc.flop_registry:
        # sdpa_flop is already wrapped to take shapes (get_raw=True avoids wrapping twice)
        fc.register_flop_formula(op, get_raw=True)(fc.sdpa_flop)


def torch_flops(fn: Callable[[], object]) -> dict:
    """FLOPs of one call counted by torch (matmuls and convolutions as 2 x MACs, attention
    core included; norms/activations/adds are not counted). Returns total and per op."""
    from torch.utils.flop_counter import FlopCounterMode
    register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get('Global', {}).items()}
    return dict(total=int(counter.get_total_flops()), per_op=per_op)


def xla_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled executable (`vd_jax.train.observe.cost_analysis`, what
    the trainer's MFU uses): flops (all ops, incl. elementwise), transcendentals, bytes
    accessed."""
    from vd_jax.train import observe  # not at module level: it imports jax (see the docstring)
    ca = observe.cost_analysis(compiled)
    return {k: float(ca[k]) for k in ('flops', 'transcendentals', 'bytes accessed') if k in ca}


def hlo_dot_conv_flops(compiled) -> int:
    """2 x MACs of every dot and convolution in the optimised HLO (the same quantity torch's
    counter reports), by parsing the HLO text. Cross-checks `xla_cost`, which also counts
    elementwise ops but leaves out the products with a convolution's zero padding; XLA's API
    gives no per-op FLOP count, so no library function yields this number."""
    import re
    text = compiled.as_text()
    shapes = {}
    total = 0
    inst = re.compile(r'^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+(\w+)\((.*)$')
    for line in text.splitlines():
        m = inst.match(line)
        if not m:
            continue
        name, _, dims, op, rest = m.groups()
        shape = tuple(int(d) for d in dims.split(',') if d)
        shapes[name.lstrip('%')] = shape
        if op not in ('dot', 'convolution'):
            continue
        args = re.findall(r'%?([\w.\-]+)', rest.split(')', 1)[0])
        if len(args) < 2 or args[0] not in shapes or args[1] not in shapes:
            continue
        a, b = shapes[args[0]], shapes[args[1]]
        out = 1
        for d in shape:
            out *= d
        if op == 'dot':
            cd = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
            k = 1
            for i in (int(x) for x in cd.group(1).split(',') if x) if cd else ():
                k *= a[i]
            total += 2 * out * k
        else:
            dl = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line)
            if not dl:
                continue
            kl = dl.group(2)
            k = 1
            for ch, size in zip(kl, b):
                if ch != 'o':  # kernel spatial dims and input features
                    k *= size
            fg = re.search(r'feature_group_count=(\d+)', line)
            total += 2 * out * k // (int(fg.group(1)) if fg else 1)
    return total


def _repeat(fn: Callable[[], object], reps: int, warmup: int) -> List[float]:
    """Seconds of `reps` timed calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn) for _ in range(reps)]


def gemm_peak(sizes: Sequence[int] = (2048, 4096), libs: Sequence[str] = ('numpy', 'torch', 'jax'),
              reps: int = 5, warmup: int = 2, log: Callable[[str], None] = print) -> dict:
    """Square f32 GEMM throughput (GFLOP/s = 2 n^3 / t) per library and size, measured now
    (jax: `vd_jax.train.observe.matmul_seconds`, the timer of the trainer's CPU peak; numpy
    and torch multiply the same matrices). Returns {lib: {n: stats + gflops_median/min/max}}."""
    import numpy as np
    from vd_jax.train import observe  # not at module level: it imports jax (see the docstring)
    out: Dict[str, dict] = {}
    for n in sizes:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
        seconds: Dict[str, List[float]] = {}
        if 'numpy' in libs:
            seconds['numpy'] = _repeat(lambda a=a, b=b: a @ b, reps, warmup)
        if 'torch' in libs:
            import torch
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            seconds['torch'] = _repeat(lambda ta=ta, tb=tb: torch.mm(ta, tb), reps, warmup)
        if 'jax' in libs:
            seconds['jax'] = observe.matmul_seconds('float32', n, min_seconds=0.0,
                                                    min_reps=reps, warmup=warmup)
        for lib, ts in seconds.items():
            st = stats(ts)
            fl = 2.0 * n ** 3
            st.update(gflops_median=fl / st['median'] / 1e9, gflops_min=fl / st['max'] / 1e9,
                      gflops_max=fl / st['min'] / 1e9)
            out.setdefault(lib, {})[str(n)] = st
            log(f'  GEMM {lib:5s} f32 {n}^2: {st["gflops_median"]:6.1f} GFLOP/s '
                f'({st["gflops_min"]:.1f}-{st["gflops_max"]:.1f})')
    return out


def read_bandwidth(nbytes: int = 2**30, reps: int = 5, log: Callable[[str], None] = print) -> dict:
    """Memory read bandwidth (GB/s): sum of an f32 array of `nbytes`, torch and jax, median."""
    import numpy as np
    a = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    out = {}
    fns = {}
    try:
        import torch
        ta = torch.from_numpy(a)
        fns['torch'] = lambda: float(ta.sum())
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp
    ja = jnp.asarray(a)
    s = jax.jit(jnp.sum)
    fns['jax'] = lambda: s(ja).block_until_ready()
    for lib, fn in fns.items():
        fn()
        st = stats([timed(fn) for _ in range(reps)])
        out[lib] = dict(gbps_median=nbytes / st['median'] / 1e9, gbps_max=nbytes / st['min'] / 1e9,
                        **st)
        log(f'  read bandwidth {lib}: {out[lib]["gbps_median"]:.1f} GB/s')
    return out


def machine_peaks(rec: dict, smoke: bool, bandwidth: bool = False,
                  log: Callable[[str], None] = print) -> None:
    """Measure the f32 GEMM peak (and optionally the read bandwidth) at the start of a run
    and store them in `rec` ('gemm', 'bandwidth'): the limits the run's rates are set against."""
    log('== f32 GEMM peak' + (' and read bandwidth' if bandwidth else ''))
    rec['gemm'] = gemm_peak((256,) if smoke else (2048, 4096), reps=1 if smoke else 5,
                            warmup=1 if smoke else 2)
    if bandwidth:
        rec['bandwidth'] = read_bandwidth(2**24 if smoke else 2**30, reps=2 if smoke else 5)


def best_peak(gemm: dict, n: int = 4096) -> Optional[float]:
    """The machine's f32 matmul peak: the best library median at size n (else the largest)."""
    vals = [peak_of(gemm, lib, n) for lib in gemm]
    vals = [v for v in vals if v]
    return max(vals) if vals else None


def pct(gflops: float, gemm: Optional[dict], lib: str) -> str:
    """'x GF/s (a% of lib's GEMM, b% of the best GEMM)'."""
    if not gemm:
        return f'{gflops:.1f}'
    own, best = peak_of(gemm, lib), best_peak(gemm)
    return f'{gflops:.1f} ({100 * gflops / own:.0f}% / {100 * gflops / best:.0f}%)'


def peak_of(gemm: dict, lib: str, n: int = 4096) -> Optional[float]:
    """Median GFLOP/s of `lib` at size n (falls back to the largest size measured)."""
    d = gemm.get(lib) or {}
    if not d:
        return None
    key = str(n) if str(n) in d else max(d, key=int)
    return d[key]['gflops_median']


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (what BENCHMARKS.md shows)."""
    def fmt(v):
        if isinstance(v, float):
            return f'{v:.4g}' if abs(v) < 1e4 else f'{v:.3e}'
        return str(v)
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(fmt(v) for v in r) + ' |' for r in rows]
    return '\n'.join(lines)


def fmt_s(st: dict) -> str:
    """'median (min-max, n)' in seconds."""
    return f"{st['median']:.3f} ({st['min']:.3f}-{st['max']:.3f}, n={st['n']})"


def write_record(name: str, record: dict, out_dir: str, smoke: bool = False) -> str:
    """Write `<out_dir>/<name>[-<tag>][-smoke].json` (machine info added; the tag comes from
    `record['args']['tag']`) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    tag = (record.get('args') or {}).get('tag')
    path = os.path.join(out_dir, f"{name}{'-' + tag if tag else ''}{'-smoke' if smoke else ''}.json")
    record = dict(record)
    record.setdefault('machine', machine_info())
    if 'gemm' not in record:  # every record carries its machine's f32 GEMM peaks
        print('== f32 GEMM peaks of this machine (numpy, torch, jax), for the record')
        libs = [lib for lib in ('numpy', 'torch', 'jax') if _importable(lib)]
        record['gemm'] = gemm_peak((256,) if smoke else (2048,), libs=libs,
                                   reps=1 if smoke else 5, warmup=1 if smoke else 2)
    record['machine']['loadavg_at_end'] = os.getloadavg()
    record['smoke'] = smoke
    if os.path.exists(path):  # an earlier run's record is kept, not overwritten
        prev_dir = os.path.join(out_dir, 'previous')
        os.makedirs(prev_dir, exist_ok=True)
        stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime('%Y%m%d-%H%M%S')
        kept = os.path.join(prev_dir, f'{os.path.basename(path)[:-5]}-{stamp}.json')
        os.replace(path, kept)
        print(f'kept the previous record as {kept}')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1, default=_jsonable)
    os.replace(tmp, path)
    print(f'wrote {path}')
    return path


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _jsonable(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def run_child(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              timeout: Optional[float] = None) -> dict:
    """Run `python argv...` in a fresh process whose last stdout line is a JSON object;
    return it (plus the child's wall time). Used where a measurement needs its own process
    (peak RSS, XLA flags)."""
    e = dict(os.environ)
    e.update(env or {})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f'child {argv} failed ({p.returncode}):\n{p.stdout[-3000:]}\n'
                           f'{p.stderr[-3000:]}')
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{')]
    if not lines:
        raise RuntimeError(f'child {argv} printed no JSON result:\n{p.stdout[-2000:]}')
    out = json.loads(lines[-1])
    out['child_wall_s'] = wall
    return out


def torch_cfg_step(unet, sched, guidance: float, flat: bool = False):
    """One classifier-free-guided scheduler step of a diffusers UNet, the PyTorch side of
    every sampler benchmark: step(x, t, ctx2) with ctx2 = cat[uncond, cond] runs one batched
    forward over cat[x, x]. flat: the text stream's (B, C) latents enter diffusers'
    UNetFlatConditionModel as (B, C, 1, 1)."""
    import torch

    def step(x, t, ctx2):
        with torch.inference_mode():
            xx = torch.cat([x, x])
            eps = unet(xx[:, :, None, None] if flat else xx, t, encoder_hidden_states=ctx2).sample
            e_u, e_c = (eps[:, :, 0, 0] if flat else eps).chunk(2)
            eps = e_u + guidance * (e_c - e_u)
            return sched.step(eps, t, x, eta=0.0).prev_sample
    return step
