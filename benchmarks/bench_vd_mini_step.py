"""VD-mini training step: where one step's time goes, and v2's vs v3's recipe in examples/s.

For each VD setting of the VD-mini recipe (`configs/train_vd_mini.py`: 'basic', 'dc',
'four_flow') and each recipe:
  v3  the config as it is (v-prediction on a zero-terminal-SNR schedule)
  v2  the same with model.schedule.prediction_type=epsilon and
      model.schedule.rescale_zero_terminal_snr=False
one process builds the run with the trainer's own API (`vd_jax.train.setup`: data loader of
the shapes world, `HostPrep`, the frozen encoders of the shipped VD-mini checkpoint
`vd_jax/weights/vd_mini` passed as `encoders.ckpt` like `vd_jax.train.stages` passes the
stage-0 exports, the jitted train step), takes ONE batch of real shapes-world records from the
run's loader and times on that constant batch:

  loader    `next(iterator)` of the run's loader: new records each call (not the constant
            batch; the part of perf/input_s that reads and decodes records)
  host      host preparation: `run.host_prep` (tokenizers, float images) + the transfer onto
            the mesh (`vd_jax.sharding.global_batch`), blocked on the device arrays
  encoders  the frozen encoders alone (`run.frozen`: AutoKL latents, CLIP contexts, Optimus
            latents; what `vd_jax.data.preencode` would take out of the loop), blocked
  step      the jitted train step alone on the already-encoded batch (+ the unconditional
            contexts CFG dropout swaps in): diffuser forward/backward, AdamW, EMA
  whole     one step as `vd_jax.train.loop.train` runs it: launch `run.step_fn`, then read
            the next batch with `vd_jax.train.run.global_batch` (host prep, transfer, encoders
            launched; JAX dispatches asynchronously, so they may overlap the running step),
            blocked on the step's metrics and the next batch
  input     perf/input_s itself: `global_batch` on the loader (new records), timed up to its
            return like the loop's `InputClock`, i.e. without waiting for the launched encoders

The encoders are a separate jitted program the loop calls before the step (`run.frozen` inside
`global_batch`), not part of the train step, so they are timed alone without any change.
Each part is the median of `--reps` calls after the first (compiling) call and `--warmup`
more; the recipes' callables are timed interleaved (`common.interleaved`, ABBA order per
round), so drifts of this shared machine hit both alike ('input' runs after them: its clock
must stop before its encoders finish). Reported per (stage, recipe): the times, first-call and
compile seconds (compile ~ first call - median), examples/s = batch / whole, the encoders'
share of the whole step, XLA's FLOPs of the train step and of the encoders
(`vd_jax.train.observe.speed_limits` / `cost_analysis`) with TFLOP/s and MFU against the peak
the trainer's perf/mfu uses (`observe.peak_tflops`: measured f32 matmul on CPU). The record
goes to benchmarks/results/bench_vd_mini_step[-<tag>][-smoke].json.

The diffuser starts from numpy-random weights (`init.method=random`, instant; the recipe's
'exact' init compiles one more program and changes no timing): the step's cost does not depend
on the weights' values. The world is built once into `<workdir>/data` (`--records` training
records; the constant batch comes from it; `--data` reuses a built one, e.g. a run's).

  python benchmarks/bench_vd_mini_step.py                  # 3 stages x {v2, v3}, batch 32, 5 reps
  python benchmarks/bench_vd_mini_step.py --stages four_flow --reps 10 --batch 64
  python benchmarks/bench_vd_mini_step.py --data /work/runs/data --records 20000  # a built world
  python benchmarks/bench_vd_mini_step.py --smoke          # basic, batch 2, 2 reps (CI)
"""
from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RECIPE = os.path.join(common.REPO, 'configs', 'train_vd_mini.py')
STAGES = ('basic', 'dc', 'four_flow')
# v2's objective (eps on VD's schedule) as overrides of the v3 config
RECIPES = {'v3': [],
           'v2': ['model.schedule.prediction_type=epsilon',
                  'model.schedule.rescale_zero_terminal_snr=False']}
PARTS = ('loader', 'host', 'encoders', 'step', 'whole')


def recipe_config(stage: str, recipe: str, args):
    """The training config of `stage` under `recipe`, as the stage runner would build it, plus
    this benchmark's data folder, batch and instant random init."""
    from vd_jax.config import load_config
    from vd_jax.train.settings import apply_overrides
    cfg = load_config(f'{RECIPE}:{stage}')
    apply_overrides(cfg, [f'data.path={args.data}', f'data.num_records={args.records}',
                          f'encoders.ckpt={args.encoders}', f'batch_size={args.batch}',
                          'init.method=random'] + RECIPES[recipe])
    return cfg


class Bench:
    """One (stage, recipe): the trainer's run, its state, the constant batch in every form the
    loop has it, and the callables timed."""

    def __init__(self, stage: str, recipe: str, args, raw=None, log=print):
        import jax
        from vd_jax import train as trainer
        from vd_jax.train import run as run_lib
        self.stage, self.recipe = stage, recipe
        self.cfg = recipe_config(stage, recipe, args)
        t0 = time.perf_counter()
        self.run = trainer.setup(self.cfg, args.workdir)
        self.state = trainer.initial_state(self.run)
        self.setup_s = time.perf_counter() - t0
        if not self.run.encode_records:  # the split below assumes the loop's encoder call
            raise RuntimeError(f'{stage}/{recipe}: the run does not encode records on device')
        self.iterator = iter(self.run.loader)
        # the constant batch: the first loader batch (the recipes share it: same data config)
        self.raw = raw if raw is not None else next(self.iterator)
        self.enc_key = run_lib.encoder_key(self.cfg)
        self._global_batch = run_lib.global_batch
        self._n = 0  # the loop folds the step index into the encoders' key
        self.first = {}
        # the first call of each part compiles what it needs (host prep: nothing)
        self.first['host'] = common.timed(self.host)
        self.device = self.host()
        t0 = time.perf_counter()
        self.encoded = common.block(self.run.frozen(self.device, self._key()))
        self.first['encoders'] = time.perf_counter() - t0
        self.encoded = dict(self.encoded, **self.run.consts)
        self.first['step'] = common.timed(self.step)
        # the loop's carried batch: encoded from the constant records by the trainer's function
        self.next_batch = common.block(self._global_batch(self.run, itertools.repeat(self.raw),
                                                          self._n, self.enc_key))
        self.first['whole'] = common.timed(self.whole)
        self.first['loader'] = common.timed(self.loader)
        self.params = sum(int(x.size) for x in jax.tree.leaves(self.state.params))
        log(f'  {stage}/{recipe}: setup {self.setup_s:.1f}s, first calls ' +
            ', '.join(f'{k} {v:.2f}s' for k, v in self.first.items()))

    def _key(self):
        import jax
        self._n += 1
        return jax.random.fold_in(self.enc_key, self._n)

    def input_times(self, reps: int) -> list:
        """perf/input_s as the loop measures it (`InputClock.reading` around `global_batch`):
        new records from the run's loader, host prep, transfer, the encoders launched; timed
        up to the return, the launched encoders blocked on only after the clock stopped (so
        they do not spill into the next timing). On a backend whose dispatch is asynchronous
        it leaves out the encoders' run; whether it does here shows against loader + host."""
        out = []
        for _ in range(reps):
            self._n += 1
            t0 = time.perf_counter()
            batch = self._global_batch(self.run, self.iterator, self._n, self.enc_key)
            out.append(time.perf_counter() - t0)
            common.block(batch)
        return out

    # ---- the timed parts; each blocks on its result ----

    def loader(self):
        return next(self.iterator)

    def host(self):
        from vd_jax import sharding as shd
        host = self.run.host_prep(self.raw)
        return common.block(shd.global_batch(host, self.run.mesh, self.run.sc.rules))

    def encoders(self):
        return common.block(self.run.frozen(self.device, self._key()))

    def step(self):
        self.state, self.metrics = self.run.step_fn(self.state, self.encoded)
        return common.block((self.state, self.metrics))

    def whole(self):
        # vd_jax.train.loop.train's order: launch the step, then read the next batch while it
        # runs (`global_batch`: host prep, transfer, encoders launched), here on the constant
        # records. The loop blocks only at its sync points; blocking on both here makes each
        # call one step of the loop's composition (with whatever overlap the runtime gives the
        # step and the next batch's preparation and encoders) and keeps launched work from
        # spilling into the next timed call; the next step needs the encoded batch anyway
        self.state, self.metrics = self.run.step_fn(self.state, self.next_batch)
        self._n += 1
        self.next_batch = self._global_batch(self.run, itertools.repeat(self.raw), self._n,
                                             self.enc_key)
        return common.block((self.metrics, self.next_batch))

    # ---- FLOPs ----

    def _encoder_flops(self):
        """XLA's FLOPs of the frozen encoders' compiled program. `FrozenEncoders.__call__`
        enters the mesh itself (`jax.set_mesh`, not allowed under an outer jit), so it cannot
        be wrapped in a jit and lowered; instead its one jitted program
        (`vd_jax.train.inputs._encode_batch`) is lowered with the very arguments a call passes
        (captured by wrapping it for one call), so the count follows the trainer's code."""
        import jax
        from vd_jax.train import inputs, observe
        program, seen = inputs._encode_batch, []

        def capture(*a):
            seen.append(a)
            return program(*a)
        inputs._encode_batch = capture
        try:
            common.block(self.run.frozen(self.device, self.enc_key))
        finally:
            inputs._encode_batch = program
        with jax.set_mesh(self.run.mesh):
            compiled = program.lower(*seen[0]).compile()
        flops = observe.cost_analysis(compiled).get('flops')
        return float(flops) if flops else None

    def flops(self, log=print) -> dict:
        """XLA's FLOPs of the train step (`observe.speed_limits`, exactly what the trainer's
        perf/mfu uses, with its peak) and of the frozen encoders' program."""
        from vd_jax.train import observe
        step, peak, where = observe.speed_limits(
            self.run.step_fn, self.state, self.encoded, self.run.sc, self.run.mesh,
            str(self.cfg.dtype), float(self.cfg.perf.peak_tflops))
        try:
            enc = self._encoder_flops()
        except Exception as e:  # noqa: BLE001 -- a backend without cost analysis
            log(f'  no FLOP count of the encoders ({type(e).__name__}: {e})')
            enc = None
        return dict(step=step, encoders=enc, peak_tflops=peak, peak_from=where)


def summarize(b: Bench, times: dict, fl: dict, batch: int) -> dict:
    """The record of one (stage, recipe) from its timings."""
    import math
    import numpy as np
    from vd_jax.train import observe
    med = {p: times[p]['median'] for p in PARTS}
    whole = med['whole']
    out = dict(stage=b.stage, recipe=b.recipe, batch=batch,
               flows=[f.name for f in b.run.flows], params=b.params,
               prediction_type=str(b.cfg.model.schedule.prediction_type),
               rescale_zero_terminal_snr=bool(b.cfg.model.schedule.rescale_zero_terminal_snr),
               frozen_parts=list(b.run.frozen.parts), setup_s=b.setup_s,
               times=times, first_call_s=b.first,
               # the first call minus a steady one: XLA compile (+ first-run effects)
               compile_s={p: max(0.0, b.first[p] - med[p]) for p in ('encoders', 'step')},
               # host + encoders + step run one after another, for comparison with `whole`
               sum_of_parts_s=med['host'] + med['encoders'] + med['step'],
               examples_per_s=batch / whole,
               encoder_share=med['encoders'] / whole,
               host_share=med['host'] / whole, step_share=med['step'] / whole,
               flops=fl)
    if fl.get('step'):
        out['step_alone'] = observe.utilisation(fl['step'], fl['peak_tflops'], 1.0 / med['step'])
        total = fl['step'] + (fl.get('encoders') or 0.0)
        out['whole_step'] = observe.utilisation(total, fl['peak_tflops'], 1.0 / whole)
    loss = float(np.asarray(b.metrics['loss']))
    out['loss_last'] = loss
    out['loss_finite'] = math.isfinite(loss)
    return out


def measure_stage(stage: str, args, log=print) -> list:
    """Build every recipe of `stage`, compile, then time all parts of all recipes
    interleaved."""
    benches, raw = {}, None
    for recipe in args.recipes:
        benches[recipe] = Bench(stage, recipe, args, raw, log)
        raw = benches[recipe].raw
    fns = {f'{r}/{p}': getattr(b, p) for p in PARTS for r, b in benches.items()}
    times = common.interleaved(fns, args.reps, args.warmup, log=log)
    # perf/input_s cannot be one of the interleaved callables: its time must stop before the
    # encoders it launched finish
    for r, b in benches.items():
        times[f'{r}/input'] = common.stats(b.input_times(args.reps))
        log(f"  {r}/input (perf/input_s): {common.fmt_s(times[f'{r}/input'])}")
    out = []
    for r, b in benches.items():
        t0 = time.perf_counter()
        fl = b.flops(log)
        log(f'  {stage}/{r}: FLOP counts and peak in {time.perf_counter() - t0:.1f}s')
        out.append(summarize(b, {p: times[f'{r}/{p}'] for p in PARTS + ('input',)}, fl,
                             args.batch))
        x = out[-1]
        log(f"  {stage}/{r}: whole {common.fmt_s(x['times']['whole'])}, "
            f"{x['examples_per_s']:.2f} ex/s, encoders {100 * x['encoder_share']:.0f}%, "
            f"loss {x['loss_last']:.4f}")
    return out


def main(argv=None):
    ap = common.base_parser(__doc__.split('\n\n')[0])
    ap.add_argument('--stages', nargs='+', choices=STAGES, default=None,
                    help="VD settings (default all three; --smoke: 'basic')")
    ap.add_argument('--recipes', nargs='+', choices=sorted(RECIPES), default=['v2', 'v3'])
    ap.add_argument('--batch', type=int, default=None,
                    help="global batch (default the recipe's, 32; --smoke: 2)")
    ap.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(),
                                                      'vd_jax_bench_vd_mini_step'),
                    help='where the shapes world is built (<workdir>/data) and the runs live')
    ap.add_argument('--data', default=None,
                    help='the shapes-world folder (data.path; default <workdir>/data)')
    ap.add_argument('--records', type=int, default=256,
                    help='training records of the world built there (data.num_records; the '
                         'recipe trains on 20000, a built world of that size is reused as is)')
    ap.add_argument('--encoders', default=None,
                    help='encoders.ckpt: folder(s) with the stage-0 parts (default the shipped '
                         'vd_jax/weights/vd_mini)')
    args = ap.parse_args(argv)
    args.stages = args.stages or (['basic'] if args.smoke else list(STAGES))
    args.batch = args.batch or (2 if args.smoke else None)
    args.reps = args.reps or (2 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.data = args.data or os.path.join(args.workdir, 'data')
    common.setup(args.threads, jaxlib_defaults=args.xla_default)
    from vd_jax.pipeline import MODELS  # after setup: it imports jax
    args.encoders = args.encoders or MODELS['vd-mini']
    if args.batch is None:  # the recipe's own batch (the same for all three settings)
        from vd_jax.config import load_config
        args.batch = int(load_config(f'{RECIPE}:{args.stages[0]}').batch_size)
    rec = dict(benchmark='vd_mini_step', args=vars(args), machine=common.machine_info(), runs=[])
    t0 = time.perf_counter()
    for stage in args.stages:
        print(f"== {stage}: recipes {', '.join(args.recipes)}, batch {args.batch}, "
              f'{args.reps} reps')
        rec['runs'] += measure_stage(stage, args)
    rec['wall_s'] = time.perf_counter() - t0
    common.write_record('bench_vd_mini_step', rec, args.out, args.smoke)
    print_tables(rec)
    return rec


def print_tables(rec):
    """Time per part, throughput and utilisation per (stage, recipe), and v2 vs v3."""
    def ms(st):
        return f"{1e3 * st['median']:.1f} ({1e3 * st['min']:.1f}-{1e3 * st['max']:.1f})"
    rows = []
    for r in rec['runs']:
        t = r['times']
        mfu = r.get('whole_step', {}).get('perf/mfu')
        smfu = r.get('step_alone', {}).get('perf/mfu')
        gf = (r['flops'].get('step') or 0) + (r['flops'].get('encoders') or 0)
        rows.append((r['stage'], r['recipe'], r['batch'], ms(t['loader']), ms(t['host']),
                     ms(t['input']), ms(t['encoders']), ms(t['step']), ms(t['whole']),
                     f"{1e3 * r['sum_of_parts_s']:.1f}", f"{r['examples_per_s']:.2f}",
                     f"{100 * r['encoder_share']:.0f}%",
                     f"{r['compile_s']['encoders']:.1f} / {r['compile_s']['step']:.1f}",
                     f'{gf / 1e9:.2f}' if gf else '-',
                     f'{100 * smfu:.1f}% / {100 * mfu:.1f}%' if mfu and smfu else '-'))
    print('\nVD-mini training step, ms: median (min-max) per call, constant batch of shapes-world '
          'records\n' + common.table(
              ['stage', 'recipe', 'batch', 'loader', 'host prep', 'perf/input_s', 'encoders',
               'train step', 'whole step', 'host+enc+step', 'examples/s', 'encoders/whole',
               'compile s enc / step', 'GFLOP step+enc', 'MFU step / whole'], rows))
    by = {(r['stage'], r['recipe']): r for r in rec['runs']}
    pairs = [(s, by[(s, 'v2')], by[(s, 'v3')]) for s in dict.fromkeys(r['stage'] for r in rec['runs'])
             if (s, 'v2') in by and (s, 'v3') in by]
    if pairs:
        print('\nv2 (eps, VD schedule) vs v3 (v-prediction, zero terminal SNR), examples/s of '
              'the whole step\n' + common.table(
                  ['stage', 'v2 ex/s', 'v3 ex/s', 'v3 / v2', 'train step v3 / v2'],
                  [(s, f"{a['examples_per_s']:.2f}", f"{b['examples_per_s']:.2f}",
                    f"{b['examples_per_s'] / a['examples_per_s']:.3f}",
                    f"{b['times']['step']['median'] / a['times']['step']['median']:.3f}")
                   for s, a, b in pairs]))
    peak = next((r['flops'].get('peak_tflops') for r in rec['runs']
                 if r['flops'].get('peak_tflops')), None)
    if peak:
        print(f"\nMFU against {1e3 * peak:.1f} GFLOP/s per device "
              f"({rec['runs'][0]['flops'].get('peak_from')})")
    print('loader: new records per call, not in the whole step (which reuses the constant '
          "batch); the recipes share the encoders' program (compiled by the first recipe only)")


if __name__ == '__main__':
    main()
