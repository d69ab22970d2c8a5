"""Train Versatile Diffusion (any subset of its four flows) on a device mesh.

  python train.py --config configs/train_tiny.py --workdir /tmp/vd_tiny [key=value ...]

Overrides are `key=value` or `--config.key=value` (a mistyped key is an error), e.g.
`optimizer.lr=5e-5 mesh.fsdp=8 "flows=['t2i','i2i']"`. Re-running the same command resumes
from the latest checkpoint in the workdir. Once the first step has run, SIGTERM or Ctrl-C
saves a checkpoint and stops (exit code 75, so schedulers can tell a preempted run from a
finished one, 0); before that (data preparation, the first compile) there is nothing to save
and either signal stops the process at once.
Several hosts: run the same command on every host with --distributed (TPU/GPU clusters
find their peers themselves; elsewhere add --coordinator HOST:PORT --num_processes N
--process_id I). `--export` only writes the EMA weights of the latest checkpoint.
`--profile-steps 10:15` writes a JAX profiler trace of those steps into <workdir>/profile/.
"""
import argparse
import logging
import os
import signal
import sys

from vd_jax.platform import (EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE,
                             configure_logging, exit_codes_epilog, quiet_libraries)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 2)[2] + '\n' +
                                exit_codes_epilog(EXIT_DIVERGED, EXIT_PREEMPTED))
    p.add_argument('--config', required=True,
                   help="config file or name with optional ':arg' (configs/train_tiny.py:test)")
    p.add_argument('--workdir', required=True, help='checkpoints, metrics.jsonl, export/')
    p.add_argument('--export', action='store_true',
                   help='export the EMA of the latest checkpoint and exit (no training)')
    p.add_argument('--distributed', action='store_true', help='call jax.distributed.initialize')
    p.add_argument('--coordinator', default=None, help='HOST:PORT of process 0 (--distributed)')
    p.add_argument('--num_processes', type=int, default=None)
    p.add_argument('--process_id', type=int, default=None)
    p.add_argument('--profile-steps', default=None, metavar='A:B',
                   help='write a JAX profiler trace of steps A..B (1-based, inclusive) into '
                        '<workdir>/profile/ (view with TensorBoard + tensorboard-plugin-profile, '
                        'or XProf)')
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if r.startswith('--') and not r.startswith('--config.')]
    if bad:
        p.error(f'unrecognized arguments: {bad}')
    return args, rest


def _usage_error(message) -> int:
    print(f'error: {message}', file=sys.stderr)
    return EXIT_USAGE


def main(argv=None):
    # Until the loop arms its own handler after the first step, Ctrl-C has nothing to save:
    # stop at once. (Python's default handler only raises KeyboardInterrupt when control
    # returns to the interpreter, i.e. after a compile of a minute or more has finished.)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    quiet_libraries()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from vd_jax.platform import configure_xla
    configure_xla()  # before JAX starts: XLA's own CPU kernels (BENCHMARKS.md)

    import jax
    if args.distributed:
        if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
            # CPU devices of different processes need a collectives backend (harmless on
            # TPU/GPU hosts, where it only concerns the CPU client).
            jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)

    from vd_jax.config import load_config
    from vd_jax.outputs import check_output_folder
    from vd_jax.errors import CheckpointError, ConfigError, TrainingDiverged
    from vd_jax.train import apply_overrides, export_from_workdir, train
    from vd_jax.train.observe import parse_profile_steps

    try:
        cfg = load_config(args.config)
        apply_overrides(cfg, overrides)
        profile_steps = parse_profile_steps(args.profile_steps)
        check_output_folder(args.workdir, '--workdir')
    except (ConfigError, ValueError, FileNotFoundError) as e:  # InputError included
        return _usage_error(e)
    logging.info('process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    if args.export:
        try:
            print(export_from_workdir(cfg, args.workdir))
        except (CheckpointError, ConfigError) as e:  # no checkpoint; not the run's model
            return _usage_error(e)
        return EXIT_OK
    try:
        out = train(cfg, args.workdir, profile_steps=profile_steps)
    except TrainingDiverged as e:
        logging.error('%s', e)
        return EXIT_DIVERGED
    except (ConfigError, ValueError) as e:
        return _usage_error(e)
    logging.info('%s at step %d%s', out['status'], out['step'],
                 f"; EMA weights in {out['export']}" if out['export'] else '')
    return EXIT_PREEMPTED if out['status'] == 'preempted' else EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
