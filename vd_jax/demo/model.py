"""The model the demo serves (`vd_jax.cli.model_flags.load_model`), shared by every request.

One `VersatileDiffusion` instance serves every browser session, so each (task, shapes,
steps, sampler) compiles once and is reused by later requests; `Served.lock` makes requests
run one at a time (queued), never concurrently on one device.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Dict, Optional

from vd_jax.cli.model_flags import DEFAULT_MODEL_SEED, load_model
from vd_jax.demo.inputs import examples_for
from vd_jax.errors import InputError

# Tab -> the pipeline task `check_task` is asked about (dual-guided text output is checked
# separately when chosen, see `Served.reason`).
TAB_TASKS = ('text_to_image', 'image_variation', 'image_to_text', 'text_variation',
             'dual_guided', 'multi_context', 'disentangle', 'i2t2i')


@dataclasses.dataclass
class Served:
    """The shared model, the lock that queues requests, and why tasks are unavailable."""
    vd: object
    untrained: bool
    dtype: str = 'float32'    # the compute dtype it was loaded with (recorded in settings)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    unavailable: Dict[str, str] = dataclasses.field(default_factory=dict)
    examples: object = None   # demo.inputs.Examples: the prompts/images the tabs offer
    lora_defaults: Dict[str, float] = dataclasses.field(default_factory=dict)  # name -> scale

    def __post_init__(self):
        self.unavailable = {t: r for t in TAB_TASKS + ('dual_guided_text',)
                            if (r := task_unavailable(self.vd, t))}
        if self.examples is None:
            self.examples = examples_for(self.vd.source)
        if not self.lora_defaults:
            self.lora_defaults = dict(getattr(self.vd, 'loras', {}) or {})

    def reason(self, task: str) -> Optional[str]:
        """None if the model serves `task`, else the pipeline's message naming what lacks."""
        return self.unavailable.get(task)


def task_unavailable(vd, task: str) -> Optional[str]:
    """`vd.check_task(task)`'s InputError message, or None when the task can run."""
    try:
        vd.check_task(task)
    except InputError as e:
        return str(e)
    return None


_SERVED: Optional[Served] = None
_SERVED_LOCK = threading.Lock()


def set_served(served: Served) -> None:
    """Install the model (done once by `python -m vd_jax.demo` before the server starts)."""
    global _SERVED
    _SERVED = served


def get_served(ckpt: Optional[str] = None, *, config: Optional[str] = None,
               seed: int = DEFAULT_MODEL_SEED, dtype: str = 'float32', loras=()) -> Served:
    """The installed model; loaded here on first use when the app runs without the launcher
    (e.g. `streamlit run vd_jax/demo/app.py -- --ckpt DIR`)."""
    global _SERVED
    with _SERVED_LOCK:
        if _SERVED is None:
            vd = load_model(ckpt, config=config, seed=seed, dtype=dtype, loras=loras)
            _SERVED = Served(vd, untrained=vd.source.startswith('random:'), dtype=dtype)
        return _SERVED
