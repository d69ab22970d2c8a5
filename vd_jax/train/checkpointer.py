"""`Checkpointer`: a run's Orbax checkpoints (train state with EMA, data iterator, metadata)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import grain
import orbax.checkpoint as ocp

from vd_jax.train.step import TrainState


class IteratorSnapshot:
    """A grain iterator state captured at one moment (what grain's Orbax handler saves): the
    loop captures it *before* prefetching the next batch, so it is exactly `step` batches in."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Orbax `CheckpointManager` over `<workdir>/checkpoints`: items 'state' (TrainState incl.
    EMA), 'data' (grain iterator state, one file per process) and 'meta' (JSON).

    Orbax writes each step into a temporary folder and renames it when complete, so a crash
    mid-save never leaves a partial checkpoint that restore would pick up.
    """

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=bool(async_save))
        self.mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def all_steps(self) -> List[int]:
        return list(self.mngr.all_steps())

    def save(self, step: int, state: TrainState, data_state: bytes, meta: Dict[str, Any]):
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(IteratorSnapshot(data_state)),
            meta=ocp.args.JsonSave(meta))
        self.mngr.save(step, args=args, force=True)

    def restore(self, step: int, abstract: TrainState, iterator=None):
        """(state, meta) of `step`; with `iterator`, its position is restored in place."""
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(iterator)
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        return out['state'], out['meta']

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.close()
