"""VD's tasks, one small module each, over the component layer (`vd_jax.components`).

Every task module has `run(comps, <inputs>, n, *, options: SamplingOptions, ...)` and
`PARTS_FLOWS` (the flows it runs, from which the checkpoint parts it needs follow).
`TASKS` is the one table of them; `vd_jax.pipeline.VersatileDiffusion` exposes each as a
method and `sample.py` as a `--task`.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Dict, Tuple

from vd_jax import modalities as M
from vd_jax.tasks import (disentangle, dual_guided, i2t2i, image_to_text, image_variation,
                          multi_context, text_to_image, text_variation)
from vd_jax.tasks.common import SamplingOptions  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    module: ModuleType
    flows: Tuple[str, ...]

    @property
    def parts(self) -> Tuple[str, ...]:
        return M.parts_of(self.flows)


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task('text_to_image', text_to_image, text_to_image.PARTS_FLOWS),
    Task('image_variation', image_variation, image_variation.PARTS_FLOWS),
    Task('image_to_text', image_to_text, image_to_text.PARTS_FLOWS),
    Task('text_variation', text_variation, text_variation.PARTS_FLOWS),
    Task('dual_guided', dual_guided, dual_guided.PARTS_FLOWS),
    Task('dual_guided_text', dual_guided, dual_guided.TEXT_FLOWS),
    Task('multi_context', multi_context, multi_context.PARTS_FLOWS),
    Task('disentangle', disentangle, disentangle.PARTS_FLOWS),
    Task('i2t2i', i2t2i, i2t2i.PARTS_FLOWS),
)}
