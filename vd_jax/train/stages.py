"""Run a progressive training recipe stage by stage: stage 0 (the networks the released weights
came with) then the VD settings, each stage fed the previous stages' exports.

    python -m vd_jax.train.stages --workdir runs/vd_mini [key=value ...]

runs `configs/train_vd_mini.py` stage by stage into `<workdir>/<stage>/`:

  autokl, clip, optimus     stage 0 (independent of each other)
  basic                     VD-basic, frozen encoders = the three stage-0 exports
  dc                        VD-DC, initialised from basic's export
  four_flow                 VD four-flow, initialised from dc's export

Every stage is an ordinary `train.py` run (checkpoints, exact resume, metrics.jsonl, export):
re-running the command resumes the stage it stopped in and skips finished ones. Overrides
apply to every stage (a `<stage>.` prefix limits one to that stage, e.g. `basic.total_steps=10`).
`<workdir>/stages.json` records each stage's export, wall time and final metrics;
`<workdir>/final` is the last stage's export (every part of the model).

Pre-encoded inputs: the VD stages' encoders are frozen, so before the first VD stage the
shapes world goes once through the stage-0 exports (`vd_jax.data.preencode`: AutoKL
posterior means, CLIP contexts, Optimus means; exactly what the loop would compute at every
step) into `<workdir>/encoded/<name>` (reused while the stage-0 exports stay the same), and
the VD stages read it (`data.kind=encoded`; measured: the encoders were 19-33% of every step,
BENCHMARKS.md 5b). `--encoders-in-loop` runs them inside every step instead.

Stage-0 gates (`vd_jax.eval.gates`): after each stage-0 stage's export, and before the next
stage starts, its gate runs on held-out combinations of the shapes world; the numbers go into
`stages.json` (`<stage>.gate`). A failed gate stops the run with its numbers (exit code 4); a
re-run checks the recorded result again, so it stops again until the stage is retrained (remove
`<workdir>/<stage>` and its stages.json entry) or `--ignore-gates` is given, which goes on.

    python -m vd_jax.train.stages --workdir runs/vd_mini --release vd_jax/weights/vd_mini

writes the final export with float16 storage (half the bytes; loading casts back to the compute
dtype) plus the stage record in its manifest: how the shipped default model was made.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from vd_jax.checkpoint import available_parts, load_part, read_config, write_checkpoint
from vd_jax.config import load_config
from vd_jax.errors import CheckpointError, ConfigError, GateFailed
from vd_jax.platform import EXIT_GATE_FAILED, configure_logging, configure_xla, quiet_libraries
from vd_jax.train import loop
from vd_jax.train.manifest_paths import relative_to, resolved_from
from vd_jax.train.settings import apply_overrides

logger = logging.getLogger('vd_jax.stages')

RECIPE = 'configs/train_vd_mini.py'
STAGE0 = ('autokl', 'clip', 'optimus')
VD_STAGES = ('basic', 'dc', 'four_flow')


def stage_overrides(stage: str, overrides: Sequence[str], exports: Dict[str, str],
                    init: bool = True) -> List[str]:
    """The overrides of one stage: the shared ones, its own (`stage.key=v`), the data folder
    shared by all stages, and the previous stages' exports (the stage-0 encoders; with `init`,
    the previous VD stage's export it starts from)."""
    out = []
    for o in overrides:
        head, _, rest = o.partition('.')
        if head in STAGE0 + VD_STAGES:
            if head == stage:
                out.append(rest)
        else:
            out.append(o)
    if stage in VD_STAGES:
        out.append('encoders.ckpt=' + ','.join(exports[s] for s in STAGE0))
        previous = VD_STAGES[VD_STAGES.index(stage) - 1] if stage != 'basic' else None
        if previous and init:
            out.append(f'init.sources.previous.path={exports[previous]}')
    return out


def stage_config(workdir: str, stage: str, overrides: Sequence[str], exports: Dict[str, str],
                 recipe: str = RECIPE, encoded: Optional[str] = None, init: bool = True):
    """The config `stage` runs with: the recipe's, the world folder under `workdir`, the
    stage's overrides and exports (`stage_overrides`); with `encoded`, the pre-encoded world
    at that path instead of the world."""
    cfg = load_config(f'{recipe}:{stage}')
    args = [f"data.path={os.path.join(workdir, 'data')}"]
    args += stage_overrides(stage, overrides, exports, init=init)
    if encoded is not None:
        args += ['data.kind=encoded', f'data.path={encoded}']
    apply_overrides(cfg, args)
    return cfg


def preencode_world(workdir: str, overrides: Sequence[str], exports: Dict[str, str],
                    recipe: str = RECIPE) -> Dict[str, object]:
    """The recipe's world (`<workdir>/data`) through the stage-0 exports once, for every
    flow of the last VD stage: a `vd_jax.data.preencode` dataset in `<workdir>/encoded/<name>`,
    `<name>` a digest of the exports (new exports: a new dataset). Returns {'path' (relative
    to `workdir`), 'records', 'seconds'}; an existing dataset is reused (seconds 0)."""
    import hashlib  # noqa: PLC0415
    # lazy: these pull in jax, tensorflow_datasets, grain, ... (+2 s)
    from vd_jax import sharding as shd  # noqa: PLC0415
    from vd_jax.data.preencode import preencode  # noqa: PLC0415
    from vd_jax.train import inputs  # noqa: PLC0415
    from vd_jax.train.settings import parse_flows  # noqa: PLC0415
    stage = VD_STAGES[-1]
    cfg = stage_config(workdir, stage, overrides, exports, recipe, init=False)
    inputs.adopt_encoder_scales(cfg)   # the latents' scales the stage-0 exports recorded
    if str(cfg.data.kind) != 'shapes':
        raise ConfigError(f"pre-encoding is for the shapes world (data.kind='shapes'), not "
                          f"{cfg.data.kind!r}: use --encoders-in-loop")
    # named by what decides its contents: the exports' weights (not only their paths: a
    # retrained stage may export to the same folder) and the world's settings
    h = hashlib.sha256(json.dumps([bool(cfg.encoders.vae_sample), int(cfg.data.num_records),
                                   int(cfg.data.seed), int(cfg.data.image_size)]).encode())
    for folder in str(cfg.encoders.ckpt).split(','):
        for name in sorted(f for f in os.listdir(folder) if f.endswith('.safetensors')):
            with open(os.path.join(folder, name), 'rb') as f:
                h.update(f.read())
    digest = h.hexdigest()[:12]
    out = os.path.join(workdir, 'encoded')
    rel = os.path.join('encoded', 'vd_encoded', digest)
    if os.path.isfile(os.path.join(out, 'vd_encoded', digest, '1.0.0', 'dataset_info.json')):
        logger.info('pre-encoded world: reusing %s', os.path.join(workdir, rel))
        return dict(path=rel, records=int(cfg.data.num_records), seconds=0.0)
    flows = parse_flows(cfg)
    t0 = time.time()
    source = inputs.make_source(cfg, workdir, flows)
    logger.info('pre-encoding the world (%d records) through the stage-0 exports into %s',
                len(source), os.path.join(workdir, rel))
    encoders = inputs.FrozenEncoders(cfg.model, flows, shd.create_mesh(dict(cfg.mesh)),
                                     shd.normalize_rules(cfg.logical_axis_rules),
                                     str(cfg.encoders.ckpt), bool(cfg.encoders.vae_sample))
    # the batch of the stages (32): the encoders' programs see the shapes the loop gave them
    preencode(source, inputs.make_encode_fn(encoders, seed=int(cfg.seed)), out,
              image_size=int(cfg.data.image_size), batch_size=int(cfg.batch_size), name=digest)
    seconds = round(time.time() - t0, 1)
    logger.info('pre-encoded %d records in %.0f s', len(source), seconds)
    return dict(path=rel, records=len(source), seconds=seconds)


def preflight(workdir: str, stages: Sequence[str], overrides: Sequence[str] = (),
              recipe: str = RECIPE, encoders_in_loop: bool = False) -> None:
    """Check every stage's settings as `run_stages` will run them, before the first stage
    starts: a bad override or a setting that a later stage refuses fails at once, not after
    the hour the earlier stages take. The exports that do not exist yet are placeholders."""
    # lazy: run pulls in jax, flax, the models (+2 s)
    from vd_jax.train import run, validation  # noqa: PLC0415
    from vd_jax.train.settings import StepConfig  # noqa: PLC0415
    pending = {s: os.path.join(workdir, s, 'export') for s in STAGE0 + VD_STAGES}
    encoded = os.path.join(workdir, 'encoded')
    for stage in stages:
        try:
            cfg = stage_config(workdir, stage, overrides, pending, recipe,
                               encoded if stage in VD_STAGES and not encoders_in_loop else None)
            validation.check(cfg)
            StepConfig.from_config(cfg, run.make_model(cfg))
        except ConfigError as e:
            raise ConfigError(f'stage {stage}: {e}') from None


def check_gate(stage: str, record: Dict[str, dict], path: str, ignore: bool = False) -> None:
    """The stage-0 gate of `stage` on its export: computed once (saved into `record` and the
    stages.json at `path`), then held: raises `GateFailed` unless it passed or `ignore`."""
    # lazy: vd_jax.eval.gates pulls in tensorflow_datasets, grain, orbax, ... (+0.7 s)
    from vd_jax.eval import gates  # noqa: PLC0415
    rec = record[stage]
    if 'gate' not in rec:
        logger.info('stage %s: checking its gate on held-out combinations', stage)
        result = gates.run_gate(stage, rec['export'])
        rec['gate'] = {k: result[k] for k in ('passed', 'threshold', 'failed', 'numbers',
                                              'seconds')}
        with open(path, 'w') as f:
            json.dump(record, f, indent=1)
    result = dict(gate=stage, **rec['gate'])
    if result['passed']:
        logger.info(gates.describe(result))
    elif ignore:
        logger.warning('%s; going on (--ignore-gates)', gates.describe(result))
    else:
        raise GateFailed(gates.describe(result), result)


def run_stages(workdir: str, overrides: Sequence[str] = (), stages: Sequence[str] = STAGE0 + VD_STAGES,
               recipe: str = RECIPE, ignore_gates: bool = False,
               encoders_in_loop: bool = False) -> Dict[str, dict]:
    """Train `stages` of `recipe` in order under `workdir`; returns the stages.json record.
    Each stage-0 stage's gate is checked after its export (`check_gate`): a failed one raises
    `GateFailed` before the next stage starts, unless `ignore_gates`. The VD stages read the
    world pre-encoded by the stage-0 exports (`preencode_world`; its record is each VD stage's
    'inputs') unless `encoders_in_loop`."""
    preflight(workdir, stages, overrides, recipe, encoders_in_loop)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'stages.json')
    record = json.load(open(path)) if os.path.isfile(path) else {}
    exports = {s: r['export'] for s, r in record.items() if r.get('export')}
    for stage in stages:
        if record.get(stage, {}).get('export') and os.path.isdir(record[stage]['export']):
            logger.info('stage %s: done (%s)', stage, record[stage]['export'])
            if stage in STAGE0:
                check_gate(stage, record, path, ignore_gates)
            continue
        encoded = None
        if stage in VD_STAGES and not encoders_in_loop:
            encoded = preencode_world(workdir, overrides, exports, recipe)
        cfg = stage_config(workdir, stage, overrides, exports, recipe,
                           os.path.join(workdir, encoded['path']) if encoded else None)
        logger.info('stage %s: %d steps, batch %d', stage, int(cfg.total_steps),
                    int(cfg.batch_size))
        t0 = time.time()
        out = loop.train(cfg, os.path.join(workdir, stage))
        if out['status'] != 'finished':
            logger.warning('stage %s stopped at step %d; run the command again to resume',
                           stage, out['step'])
            return record
        last = out['history'].get(out['step'], {})
        prev = record.get(stage, {})
        done = os.path.join(workdir, stage, 'export', f"step_{out['step']}")
        record[stage] = dict(export=out['export'] or prev.get('export')
                             or (done if os.path.isdir(done) else None),
                             seconds=round(prev.get('seconds', 0) + time.time() - t0, 1),
                             steps=out['step'], final={k: v for k, v in last.items()
                                                       if k.startswith(('loss', 'val/'))})
        if encoded is not None:
            record[stage]['inputs'] = dict(encoded, kind='encoded')
        exports[stage] = record[stage]['export']
        with open(path, 'w') as f:
            json.dump(record, f, indent=1)
        if stage in STAGE0:
            check_gate(stage, record, path, ignore_gates)
    final = exports.get(VD_STAGES[-1])
    if final:
        link = os.path.join(workdir, 'final')
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(final), link)
    return record


def release(workdir: str, out: str, name: Optional[str] = None) -> str:
    """Copy `<workdir>/final` (every part) into `out` with float16 storage; the manifest
    records the stages (exports, wall times, final losses) and `name` (e.g. 'VD-mini v2'),
    every path relative to `workdir`. Overwrites `out`."""
    final = os.path.join(workdir, 'final')
    if not os.path.isdir(final):
        raise CheckpointError(f"'{final}' does not exist: the last stage has not finished")
    src = os.path.realpath(final)
    with open(os.path.join(src, 'manifest.json')) as f:
        manifest = json.load(f)
    with open(os.path.join(workdir, 'stages.json')) as f:
        stages = json.load(f)
    parts = {p: load_part(src, p) for p in available_parts(src)}
    manifest.pop('parts', None)
    # every path relative to `workdir`: the manifest ships with the weights (the final
    # export's are relative to its stage's run folder, <workdir>/<stage>/export/step_N/../..)
    stage_dir = os.path.dirname(os.path.dirname(src))
    if manifest.get('frozen_parts_from'):
        manifest['frozen_parts_from'] = {
            p: relative_to(resolved_from(v, stage_dir), workdir)
            for p, v in manifest['frozen_parts_from'].items()}
    stages = {s: dict(r, export=relative_to(r['export'], workdir)) if r.get('export') else r
              for s, r in stages.items()}
    manifest.update(storage='float16 (cast to the compute dtype on load)',
                    released_from=relative_to(src, workdir), stages=stages,
                    paths_relative_to='the stages work folder (--workdir)')
    if name:
        manifest['name'] = name
    if 'data' not in manifest:  # exports made before training recorded it
        with open(os.path.join(workdir, VD_STAGES[-1], 'config.json')) as f:
            manifest['data'] = str(json.load(f)['data']['kind'])
    return write_checkpoint(out, read_config(src), parts, manifest=manifest, overwrite=True,
                            dtype=np.float16)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--workdir', required=True)
    p.add_argument('--recipe', default=RECIPE, help='a config file whose args are the stages')
    p.add_argument('--stages', default=','.join(STAGE0 + VD_STAGES))
    p.add_argument('--release', metavar='OUT', help='write the final export with float16 '
                   'storage into OUT (no training)')
    p.add_argument('--name', help="the release's name in its manifest (with --release)")
    p.add_argument('--encoders-in-loop', action='store_true',
                   help='run the frozen encoders inside every VD step instead of pre-encoding '
                        'the world once before the first VD stage')
    p.add_argument('--ignore-gates', action='store_true',
                   help='go on to the next stage when a stage-0 gate fails (the numbers are '
                        'still recorded in stages.json)')
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith('--') or '=' not in o]
    if bad:
        p.error(f'unrecognized arguments: {bad}')
    configure_logging()
    configure_xla()
    quiet_libraries()
    if args.release:
        try:
            print(release(args.workdir, args.release, args.name))
        except (CheckpointError, OSError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        return 0
    try:
        rec = run_stages(args.workdir, overrides, args.stages.split(','), args.recipe,
                         ignore_gates=args.ignore_gates,
                         encoders_in_loop=args.encoders_in_loop)
    except GateFailed as e:
        print(json.dumps(e.result['numbers'], indent=1), file=sys.stderr)
        print(f'error: {e}; stopped before the next stage (stages.json has the numbers; '
              '--ignore-gates goes on)', file=sys.stderr)
        return EXIT_GATE_FAILED
    except (ConfigError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps({s: {k: (v['passed'] if k == 'gate' else v) for k, v in r.items()
                          if k != 'final'} for s, r in rec.items()}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
