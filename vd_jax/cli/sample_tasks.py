"""sample.py's task table: how each `--task` maps onto a `VersatileDiffusion` method.

A task is either batched (t2i, i2i, i2t, t2t: one call per input x --n, in batches of
--batch-size, `CliTask.call` None) or called once with all its inputs and n (dual, multi,
disentangle, i2t2i: `CliTask.call` says how). `vd_jax.cli.sample_run.run_task` runs either
kind without knowing task names.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from vd_jax.image_io import load_image

# flags every task uses; the others belong to the tasks that list them in `CliTask.flags`
COMMON = {'ckpt', 'model', 'config', 'task', 'n', 'steps', 'scale', 'sampler', 'eta', 'seed', 'dtype',
          'batch_size', 'out', 'uncond', 'spacing', 'no_compile_cache', 'mesh', 'distributed',
          'coordinator', 'num_processes', 'process_id', 'preview_every', 'karras', 'guidance_rescale',
          'lora'}


@dataclasses.dataclass(frozen=True)
class TaskInputs:
    """What a run samples from: the prompts, the input images (uint8 (H, W, 3)), their
    files, and the --mask files (multi; 'none' for no mask)."""
    prompts: List[str]
    images: List[np.ndarray]
    paths: List[str]
    masks: List[str] = dataclasses.field(default_factory=list)


def images_only(out) -> Tuple[Any, None]:
    """A once-called method's output that is images (N, H, W, 3): (images, no texts)."""
    return out, None


@dataclasses.dataclass(frozen=True)
class CliTask:
    """How one `--task` maps onto the pipeline.

    method: the `VersatileDiffusion` method; needs: required inputs ('prompt', 'image');
    flags: the task-specific flags it reads (others given are warned about); kwargs: flags ->
    the method's keyword arguments; call: None for a batched task (one call per input x n in
    batches of --batch-size, the inputs being the prompts if it needs one, else the images),
    else call(method, inputs: TaskInputs, n, keywords) -> the method's output, for a task
    called once with n; outputs: a once-called
    task's output -> (images or None, texts or None); runs: the
    denoising runs per call (for the progress bar); input_in_grid: grid.png shows the first
    input image before the outputs.
    """
    method: str
    needs: Tuple[str, ...]
    flags: Tuple[str, ...]
    kwargs: Callable[[argparse.Namespace], dict]
    call: Optional[Callable[[Callable, TaskInputs, int, Dict[str, Any]], Any]] = None
    outputs: Callable[[Any], Tuple[Optional[np.ndarray], Optional[List[str]]]] = images_only
    runs: int = 1
    input_in_grid: bool = False

    @property
    def batched(self) -> bool:
        return self.call is None


def _focus(a):
    return 0.5 if a.focus is None else a.focus


def _first(xs):
    return xs[0] if xs else None


def _masks(inputs: TaskInputs):
    return [None if m.lower() == 'none' else load_image(m) for m in inputs.masks] or None


IMG = ('height', 'width')
TASKS: Dict[str, CliTask] = {
    't2i': CliTask('text_to_image', ('prompt',), ('prompt', 'prompts', 'negative') + IMG,
                   lambda a: dict(negative_prompt=a.negative, height=a.height, width=a.width)),
    'i2i': CliTask('image_variation', ('image',),
                   ('image', 'images', 'fidelity', 'start_step', 'focus', 'color_adjust') + IMG,
                   lambda a: dict(fidelity=a.fidelity, start_step=a.start_step, focus=_focus(a),
                                  color_adjust=a.color_adjust, height=a.height, width=a.width),
                   input_in_grid=True),
    'i2t': CliTask('image_to_text', ('image',), ('image', 'images', 'decode', 'temperature'),
                   lambda a: dict(decode=a.decode, temperature=a.temperature)),
    't2t': CliTask('text_variation', ('prompt',),
                   ('prompt', 'prompts', 'negative', 'decode', 'temperature'),
                   lambda a: dict(decode=a.decode, temperature=a.temperature,
                                  negative_prompt=a.negative)),
    'dual': CliTask('dual_guided', ('prompt', 'image'),
                    ('prompt', 'image', 'mix', 'mix_level', 'focus', 'negative') + IMG,
                    lambda a: dict(mix=a.mix, mix_level=a.mix_level, focus=_focus(a),
                                   negative_prompt=a.negative, height=a.height, width=a.width),
                    call=lambda f, x, n, kw: f(_first(x.prompts), x.images[0], n, **kw),
                    input_in_grid=True),
    'multi': CliTask('multi_context', ('image',),
                     ('image', 'images', 'prompt', 'strength', 'mask', 'mix', 'focus',
                      'negative') + IMG,
                     lambda a: dict(strengths=a.strength or None, text_strength=a.mix,
                                    focus=_focus(a), negative_prompt=a.negative,
                                    height=a.height, width=a.width),
                     call=lambda f, x, n, kw: f(x.images, prompt=_first(x.prompts), n=n,
                                                masks=_masks(x), **kw)),
    'disentangle': CliTask('disentangle', ('image',), ('image', 'focus', 'dislevel') + IMG,
                           lambda a: dict(
                               focus=None if a.dislevel is not None else
                               (1.0 if a.focus is None else a.focus),
                               level=a.dislevel, height=a.height, width=a.width),
                           call=lambda f, x, n, kw: f(x.images[0], n=n, **kw),
                           input_in_grid=True),
    # i2t2i returns (the edited captions, the images made from them): two denoising runs
    'i2t2i': CliTask('i2t2i', ('image',), ('image', 'positive', 'negative') + IMG,
                     lambda a: dict(positive=a.positive, negative=a.negative, height=a.height,
                                    width=a.width),
                     call=lambda f, x, n, kw: f(x.images[0], n=n, **kw),
                     outputs=lambda out: (out[1], out[0]), runs=2),
}
