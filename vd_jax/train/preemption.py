"""`Preemption`: SIGTERM / SIGINT -> save at the end of the current step and stop."""
from __future__ import annotations

import logging
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger('vd_jax.train')


class Preemption:
    """SIGTERM / SIGINT (Ctrl-C) -> save at the end of the current step and stop.

    The handlers are installed by `arm()` once the first step has run: before that there is
    nothing to save, and a signal during the first compile (which holds the interpreter)
    keeps the process's own action: SIGTERM's default stops the process at once, and
    train.py sets SIGINT's to the same (Python's KeyboardInterrupt would wait for the
    compile). With several processes the flags are combined at sync points
    (`requested(sync=True)`), so all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.signum = None
        self._old = {}

    def arm(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption saves
                pass

    def __enter__(self):
        return self

    def _handler(self, signum, frame):
        del frame
        logger.warning('%s received: saving a checkpoint after this step, then stopping '
                       '(send it again to stop without saving)', signal.Signals(signum).name)
        if self.flag:  # a second signal: the user means it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.flag, self.signum = True, signum

    def requested(self, sync: bool) -> bool:
        """Whether to stop now; with several processes only at sync points (all agree)."""
        if jax.process_count() == 1:
            return self.flag
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.flag))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
