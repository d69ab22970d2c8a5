"""`python -m vd_jax.demo [--ckpt DIR] [--port N] [--host 127.0.0.1]`: the web demo.

Loads the model once, then serves the Streamlit page on --host:--port. There is no public
share link or tunnel of any kind; usage statistics are off; the browser is not opened.
"""
from __future__ import annotations

import math
import os
import sys
import time

from vd_jax.cli.model_flags import load_model
from vd_jax.platform import configure_xla


def streamlit_flags(args) -> dict:
    """Streamlit's config for the demo (these override any config.toml)."""
    return {
        'server.address': args.host,
        'server.port': args.port,
        'server.headless': True,                 # do not open a browser, never prompt
        'browser.gatherUsageStats': False,       # nothing leaves this machine
        'browser.serverAddress': args.host,     # set: Streamlit then never looks up an external IP
        'logger.hideWelcomeMessage': True,      # the URL is printed by main()
        'server.maxUploadSize': max(1, math.ceil(args.max_upload_mb)),
        'server.fileWatcherType': 'none',        # no reloads of the running demo
        'server.runOnSave': False,
        'global.developmentMode': False,
        'client.toolbarMode': 'minimal',
        'client.showErrorDetails': 'none',       # errors are shown by the app as messages
    }


def main(argv=None) -> int:
    configure_xla()  # before JAX starts, as sample.py: XLA's own CPU kernels, same results
    # lazy: vd_jax.demo.model pulls in numpy (+0.1 s)
    from vd_jax.demo import model, options  # noqa: PLC0415
    argv = list(sys.argv[1:] if argv is None else argv)
    args = options.parse(argv)
    if not options.is_loopback(args.host):
        print(f'warning: listening on {args.host}: other machines on the network can reach the '
              'demo (it has no authentication)', file=sys.stderr)
    try:
        # lazy: optional dependency (streamlit)
        from streamlit.web import bootstrap  # noqa: PLC0415
    except ImportError:
        print("error: the demo needs Streamlit: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        vd = load_model(args.ckpt, config=args.config, seed=args.seed_model, dtype=args.dtype,
                        loras=args.lora)
    except (OSError, ValueError, KeyError) as e:  # CheckpointError, missing files, bad config
        print(f'error: cannot load the model: {e}', file=sys.stderr)
        return 2
    served = model.Served(vd, untrained=vd.source.startswith('random:'), dtype=args.dtype)
    model.set_served(served)
    options.set_current(args)
    print(f'loaded {vd.source} in {time.time() - t0:.1f}s', file=sys.stderr)
    for task, reason in served.unavailable.items():
        print(f'  tab unavailable: {reason}', file=sys.stderr)

    flags = streamlit_flags(args)
    bootstrap.load_config_options(flag_options=flags)
    app = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'app.py')
    print(f'Versatile Diffusion demo: http://{args.host}:{args.port}', file=sys.stderr)
    bootstrap.run(app, False, argv, flags)
    return 0


if __name__ == '__main__':
    sys.exit(main())
