"""Every benchmark script runs end to end on the tiny configs (`--smoke`) and writes its record.

The scripts are launched together, each in its own process (they are mostly single-threaded
start-up and XLA compilation, so two cores overlap them), then their JSON records are
checked: the parity numbers the smoke runs measure must hold at the tiny configs (1e-4, the
tolerance of tests/test_convert_diffuser.py, for the same fp32 comparison), and every section
the full run reports must be present. Timings are not checked: they mean nothing here.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # minutes of real runs; CI runs them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    'bench_unet': [],
    'bench_text_unet': [],
    'bench_convert': [],
    # the attention prototypes act above one block (256 queries, 512 keys): at 64x64 the
    # tiny model's level-2 self-attention has 1024 tokens
    'bench_levers': ['--profile', '--sizes', '64', '--variants', 'baseline', 'chunked', 'flash'],
    'bench_train': [],
    'bench_attention': ['--blocks', '64x128'],
    # 32x32: the tiny model's first level has 1024 tokens, so the blockwise variant acts
    'attention_share': ['--sizes', '32', '--blocks', '128x256'],
    'bench_compile_cache': [],
    'bench_fullsize': [],
    'bench_bf16_cpu': [],
    'profile_unet_ops': [],
    'bench_linear': [],
    'step_spells': [],
}
TOL = 1e-4


@pytest.fixture(scope='module')
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
    procs, t0 = {}, time.monotonic()
    for name, extra in SCRIPTS.items():
        cmd = [sys.executable, os.path.join(REPO, 'benchmarks', f'{name}.py'), '--smoke',
               '--out', str(out)] + extra
        if name in ('bench_convert', 'bench_fullsize'):
            cmd += ['--workdir', str(out / f'{name}_work')]
        with open(out / f'{name}.log', 'w') as log:   # a file: a full pipe would block it
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
    # each script's wall time (beside the others) and CPU time (its processes and theirs),
    # printed (`pytest -s`): what to trim next
    done = {}
    while len(done) < len(procs) and time.monotonic() - t0 < 900:
        for name, p in procs.items():
            if name in done:
                continue
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                done[name] = (round(time.monotonic() - t0), round(usage.ru_utime + usage.ru_stime))
        time.sleep(0.5)
    print('benchmark smoke runs (wall s, CPU s):',
          sorted(done.items(), key=lambda kv: kv[1]))
    recs, failures = {}, []
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
            (out / f'{name}.log').open('a').write('\n[killed: still running after 900 s]\n')
        log = (out / f'{name}.log').read_text()
        if p.wait() != 0:
            failures.append(f'{name} exited {p.returncode}:\n{log[-3000:]}')
            continue
        with open(out / f'{name}-smoke.json') as f:
            recs[name] = json.load(f)
    assert not failures, '\n\n'.join(failures)
    return recs


# bench_vd_mini_step runs in a fixture of its own (not in SCRIPTS): its test can be selected
# alone (`-k vd_mini_step`) without starting every other script's smoke run, and it builds a
# small shapes world into its own folder
@pytest.fixture(scope='module')
def vd_mini_step_record(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_vd_mini_step')
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
    cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'bench_vd_mini_step.py'), '--smoke',
           '--out', str(out), '--workdir', str(out / 'work')]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f'bench_vd_mini_step exited {p.returncode}:\n{p.stdout[-3000:]}\n' \
        f'{p.stderr[-3000:]}'
    with open(out / 'bench_vd_mini_step-smoke.json') as f:
        return json.load(f)


def test_records_carry_the_machine(records):
    """Every record names its host (kind, CPU family and model, ISA flags) and the f32 GEMM
    peaks of numpy, torch and jax measured in that run: numbers are compared within one kind."""
    for name, r in records.items():
        m = r['machine']
        assert r['smoke'] is True, name
        assert m['cores'] >= 1 and m['versions']['jax'] and m['cpu'], name
        assert m['host_kind'] and isinstance(m['cpu_id'].get('family'), int), (name, m)
        assert isinstance(m['cpu_flags'], list), name
        for lib in ('numpy', 'torch', 'jax'):
            assert min(v['gflops_median'] for v in r['gemm'][lib].values()) > 0, (name, lib)


def test_image_stream_smoke(records):
    r = records['bench_unet']
    assert r['model']['torch_params'] == r['model']['jax_params'] > 0
    assert r['parity']['max_abs_ref'] > 0.1
    assert r['parity']['max_abs_diff'] < TOL
    for s in r['step'].values():
        assert s['step_max_abs_diff'] < TOL
        assert s['torch']['median'] > 0 and s['jax']['median'] > 0
        # torch's counter (with the CPU-SDPA formula) counts diffusers' step; the HLO dot/conv
        # count is below it by the shared CFG prefix (x's layers up to the first self-attention
        # run once: measured 6.3% fewer at this tiny config's 16², 14.4% at full size 64²)
        assert 0.85 * s['flops_torch_counter'] < s['flops_hlo_dot_conv'] < \
            s['flops_torch_counter'], (s['flops_hlo_dot_conv'], s['flops_torch_counter'])
    lp = r['loop']
    assert lp['final_max_abs_diff'] < 1e-3 * max(1.0, lp['final_max_abs'])
    assert set(r['compile_vs_steps']) >= {str(lp['steps'])}
    assert set(r['probes']) == {'torch', 'jax'}
    assert all(p['peak_rss_gib'] >= p['rss_built_gib'] > 0 for p in r['probes'].values())
    assert r['gemm']['jax']['256']['gflops_median'] > 0


def test_text_stream_smoke(records):
    r = records['bench_text_unet']
    assert r['model']['torch_params'] == r['model']['jax_params'] > 0
    assert r['parity']['max_abs_ref'] > 0.1
    assert r['parity']['max_abs_diff'] < TOL
    assert r['step']['step_max_abs_diff'] < TOL
    assert r['step']['param_bytes'] == 4 * r['model']['jax_params']
    assert {'torch', 'jax'} <= set(r['bandwidth'])


def test_convert_smoke(records):
    from vd_jax.config import load_config
    from vd_jax.models.init import abstract_params
    from vd_jax.models.unet import Diffuser
    import jax
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
        abstract_params(Diffuser(load_config('vd_four_flow:tiny').model.diffuser))))
    r = records['bench_convert']
    assert r['generate']['diffuser_params'] == r['convert']['params'] == n
    assert r['convert']['layout'] == 'vd-v1.0' and r['convert']['ignored_keys'] == 1  # betas
    assert r['convert']['peak_rss_gib'] > 0 and r['convert']['out_gib'] > r['convert']['file_gib']


def test_levers_smoke(records):
    r = records['bench_levers']
    (size,) = r['variants']['baseline']['forward']
    assert r['variants']['baseline']['forward'][size]['median'] > 0
    assert r['variants']['baseline']['max_abs_diff_vs_baseline'][size] == 0.0
    assert r['torch']['forward'][size]['median'] > 0
    for side in (r['torch'], r['variants']['baseline']):
        prof = side['profile'][size]['by_class_ms']
        assert any('conv' in c for c in prof) and any('dot' in c for c in prof), prof
    # the attention prototypes are exact rewrites: same output as the baseline
    for name in ('chunked', 'flash'):
        assert r['variants'][name]['max_abs_diff_vs_baseline'][size] < 1e-5, name


def test_attention_smoke(records):
    r = records['bench_attention']
    assert len(r['runs']) == 3
    for run in r['runs']:
        assert set(run['times']) == {'torch_sdpa', 'packed_dense', 'dense', 'blockwise', 'auto',
                                     'blockwise_running', 'bw_64x128'}
        # every form is exact: torch's SDPA up to f32 rounding
        assert max(run['max_abs_diff_vs_torch'].values()) < 1e-5, run


def test_attention_share_smoke(records):
    r = records['attention_share']['sizes']['32']
    assert set(r['times']) == {'torch', 'torch_nocore', 'jax', 'jax_nocore', 'jax_repeat_x',
                               'jax_running', 'jax_bw_128x256'}
    # each vd_jax variant computes what its diffusers counterpart does, the ablated core too
    assert max(r['max_abs_diff_vs_torch'].values()) < TOL, r['max_abs_diff_vs_torch']
    assert set(r['core_s']) == set(r['rest_s']) == {'torch', 'jax'}


def test_train_smoke(records):
    r = records['bench_train']
    assert r['runs'] and all(np.isfinite(x['loss_last']) for x in r['runs'])
    multi = [x for x in r['runs'] if x['devices'] > 1]
    assert multi and multi[0]['mesh']['fsdp'] > 1


def test_compile_cache_smoke(records):
    r = records['bench_compile_cache']
    runs = {x['mode']: x for x in r['runs']}
    assert set(runs) == {'off', 'cold', 'warm'}
    # off writes nothing; cold misses and fills the cache; warm loads every program from it
    assert runs['off']['cache'] is None and runs['off']['cache_hits'] == 0
    assert runs['cold']['cache_misses'] > 0 and runs['cold']['cache_files'] > 0
    assert runs['warm']['cache_hits'] >= runs['cold']['cache_misses'] > 0
    assert runs['warm']['cache_misses'] == 0
    assert r['summary']['tiny']['same_output']


def test_fullsize_smoke(records):
    """The full-size run's code path on the tiny config: write a random v1.0 file, convert it,
    every task (smoke: each task once, both dtypes used, in one child process; the full run:
    every pair, each in its own process), and the bf16-vs-fp32 distance."""
    r = records['bench_fullsize']
    runs = [(x['task'], x['dtype']) for x in r['runs']]
    assert sorted(t for t, _ in runs) == sorted(('t2i', 'i2i', 'i2t', 't2t', 'dual'))
    assert {d for _, d in runs} == {'float32', 'bfloat16'}
    assert all(x['finite'] and x['peak_rss'] > 0 for x in r['runs'])
    d = r['bf16_distance']
    # one step in bf16 stays close to fp32 (bf16 keeps 8 bits of mantissa: 2**-8 = 0.4%)
    assert 0 < d['1_steps']['relative'] < 0.02, d


def test_bf16_cpu_smoke(records):
    """Both streams, the four variants, the once-per-call cast timed, and outputs that agree:
    the weights cast once give float32's output (an exact cast), bfloat16 compute is close."""
    r = records['bench_bf16_cpu']
    assert sorted(r['streams']) == ['image', 'text'] and r['machine']['cpu']
    for stream, s in r['streams'].items():
        assert set(s['step']) == {'float32', 'bfloat16', 'bf16 cast/step', 'bf16 cast/call'}
        assert s['cast_once']['median'] > 0
        d = s['max_abs_diff']
        assert d['bf16 cast/call vs float32'] <= 0.02 * d['float32 output max'], (stream, d)
        assert 0 < d['bfloat16 vs float32'] <= 0.05 * d['float32 output max'], (stream, d)


def test_vd_mini_step_smoke(vd_mini_step_record):
    """One VD-mini setting, v2's and v3's recipe: every part of the step timed on real
    shapes-world records through the shipped encoders, the recipes' schedules as configured,
    the throughput, shares and FLOP counts consistent with the times."""
    r = vd_mini_step_record
    m = r['machine']
    assert r['smoke'] is True and r['benchmark'] == 'vd_mini_step'
    assert m['host_kind'] and isinstance(m['cpu_id'].get('family'), int), m
    for lib in ('numpy', 'torch', 'jax'):
        assert min(v['gflops_median'] for v in r['gemm'][lib].values()) > 0, lib
    runs = {(x['stage'], x['recipe']): x for x in r['runs']}
    assert set(runs) == {('basic', 'v2'), ('basic', 'v3')}
    assert (runs['basic', 'v2']['prediction_type'], runs['basic', 'v2']['rescale_zero_terminal_snr']) \
        == ('epsilon', False)
    assert (runs['basic', 'v3']['prediction_type'], runs['basic', 'v3']['rescale_zero_terminal_snr']) \
        == ('v_prediction', True)
    for x in runs.values():
        assert set(x['times']) == {'loader', 'host', 'input', 'encoders', 'step', 'whole'}
        assert all(t['median'] > 0 and t['n'] == 2 for t in x['times'].values()), x['times']
        assert x['examples_per_s'] == pytest.approx(x['batch'] / x['times']['whole']['median'])
        assert x['encoder_share'] == pytest.approx(
            x['times']['encoders']['median'] / x['times']['whole']['median'])
        assert set(x['frozen_parts']) == {'vae_image', 'ctx_image'} and x['flows'] == ['i2i']
        assert x['flops']['step'] > 0 and x['flops']['encoders'] > 0
        assert 0 < x['whole_step']['perf/mfu'] and x['loss_finite']
        assert x['compile_s']['step'] > 0


def test_profile_unet_ops_smoke(records):
    """The per-op profile of the image-stream CFG step: every op the trace timed is named by
    its HLO instruction and sorted into a kind; the convolutions and dots carry FLOPs."""
    r = records['profile_unet_ops']
    assert r['smoke'] is True and r['machine']['host_kind']
    kinds = r['kinds']
    assert {'conv 3x3', 'dot: linear (q/k/v/out, FF, emb)'} <= set(kinds), sorted(kinds)
    assert all(k['ms_per_step'] > 0 and k['count_per_step'] > 0 for k in kinds.values())
    assert sum(k['ms_per_step'] for k in kinds.values()) == pytest.approx(r['op_sum_ms'], rel=1e-6)
    assert 0 < r['busy_ms'] <= r['span_ms'] * (1 + 1e-6)
    assert kinds['conv 3x3']['gflop_per_step'] > 0 and r['dot_conv_gflop_per_step'] > 0


def test_linear_smoke(records):
    """The linear products of one CFG step, read from the step's own jaxpr, each timed on both
    sides with the same result."""
    r = records['bench_linear']
    assert r['smoke'] is True and r['machine']['host_kind']
    s = r['sizes']['16']
    assert s['products'] == sum(x['count'] for x in s['shapes']) > 20
    # the tiny config's first attention level: 64 channels at 8x8, q/k/v/out and proj_in/out
    # over two 64-token rows (the CFG batch)
    assert any(x['m'] == 128 and x['k'] == x['n'] == 64 and x['count'] > 10
               for x in s['shapes']), s['shapes']
    for x in s['shapes']:
        assert x['max_abs_diff'] < 1e-4, x
    assert s['step_linear_s']['torch'] > 0 and s['step_linear_s']['jax'] > 0


def test_step_spells_smoke(records):
    """vd_jax's step timed call by call after each condition, round robin, with each call's
    CPU time, faults and steal."""
    r = records['step_spells']
    assert r['smoke'] is True and r['machine']['host_kind'] and r['size'] == 16
    assert set(r['conditions']) == {'back_to_back', 'sleep', 'churn', 'torch'}
    for name, c in r['conditions'].items():
        assert len(c['calls']) == c['wall']['n'] == 2, name
        for k in c['calls']:
            assert k['wall_s'] > 0 and k['user_s'] >= 0 and k['minflt'] >= 0, (name, k)
            assert k['steal_s'] >= 0
        assert 0 <= c['slow'] <= 2
    # what came before each call: nothing, the idle gap, the churn up to the gap, torch's step
    assert max(k['between_s'] for k in r['conditions']['back_to_back']['calls']) < 0.01
    assert min(k['between_s'] for k in r['conditions']['sleep']['calls']) >= 0.05
    assert min(k['between_s'] for k in r['conditions']['churn']['calls']) >= 0.05
    assert r['slow_threshold_s'] == pytest.approx(
        1.05 * r['conditions']['back_to_back']['wall']['median'])
