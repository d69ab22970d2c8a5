"""sample.py's runs: a task of the table (`vd_jax.cli.sample_tasks`) -> a `SampleResult`
-> files in the run folder.

The batching follows `vd_jax.batching`: sample i keeps seed + i wherever it runs (batch,
process). Modules of the pipeline are imported inside the functions: sample.py reports usage
errors before JAX loads (importing it takes ~5 s on a 2-core CPU host).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np

from vd_jax.batching import batch_size_for, padded_batches, process_share
from vd_jax.cli.distributed import merge_shares, write_share
from vd_jax.cli.sample_tasks import CliTask, TaskInputs
from vd_jax.image_io import load_image, load_images
from vd_jax.outputs import make_grid, progress_bar, save_png, write_results
from vd_jax.tokenizers import PromptTruncatedWarning, truncation_message


@dataclasses.dataclass
class SampleResult:
    """What one process sampled.

    labels: the input each output came from (prompt, image file, or the task name);
    images: (N, H, W, 3) in [0, 1] or None; texts: N sentences or None; index: the global
    sample index of each output; inputs: the task's input images, uint8 (H, W, 3);
    previews: the `--preview-every` writer, or None."""
    labels: List[str]
    images: Optional[np.ndarray]
    texts: Optional[List[str]]
    index: List[int]
    inputs: List[np.ndarray] = dataclasses.field(default_factory=list)
    previews: Optional['Previews'] = None


class _Progress:
    """progress(done, total) of the pipeline -> a progress bar over several denoising runs:
    `done` restarts at each run (i2t2i runs two); within a run it only grows, so a report
    that does not is the next run's first."""

    def __init__(self, bar):
        self.bar, self.last = bar, 0

    def __call__(self, done, total):
        self.bar.update(done - self.last if done > self.last else done)
        self.last = done


def run_task(vd, t: CliTask, args, inputs: TaskInputs, bar, share: Tuple[int, int] = (0, 1),
             preview: Optional[Callable] = None) -> SampleResult:
    """Call the pipeline for this process's share of the samples.

    share = (process index, process count): every process runs an even contiguous block of
    the samples (inputs x n for batched tasks, in batches of --batch-size or of the largest
    share if smaller; the n samples otherwise); sample i keeps seed + i wherever it runs.
    preview(tag, first seed) -> a callback(step, latents) for the denoising runs of one call
    (`--preview-every`)."""
    # lazy: vd_jax.diffusion.sampling pulls in jax, flax (+1.2 s)
    from vd_jax.diffusion.sampling import make_plan  # noqa: PLC0415
    call = getattr(vd, t.method)
    kw = dict(t.kwargs(args), steps=args.steps, scale=args.scale, sampler=args.sampler,
              eta=args.eta, spacing=args.spacing, karras=args.karras,
              guidance_rescale=args.guidance_rescale)
    me, count = share
    progress = _Progress(bar)
    steps = make_plan(args.sampler, args.steps, spacing=args.spacing, schedule=vd.schedule).num_steps
    if t.batched:  # inputs x n, split evenly over the processes, then batched on each
        xs, names = ((inputs.prompts, inputs.prompts) if 'prompt' in t.needs
                     else (inputs.images, inputs.paths))
        items = [(x, str(name)) for x, name in zip(xs, names) for _ in range(args.n)]
        size = batch_size_for(len(items), args.batch_size, count)  # one shape: no recompile
        shares = [padded_batches(lambda i: items[i][0], process_share(len(items), k, count),
                                 size, args.seed) for k in range(count)]
        nb, first = sum(map(len, shares)), sum(map(len, shares[:me]))  # numbered over all
        outs, labels, index = [], [], []
        bar.reset(total=len(shares[me]) * steps)
        for k, batch in enumerate(shares[me], start=first):
            progress.last = 0
            bar.set_description(f'{args.task} batch {k + 1}/{nb}')
            extra = {} if preview is None else dict(
                callback=preview(f'batch{k + 1:03d}_' if nb > 1 else '', batch.seed))
            outs.extend(batch.trim(call(batch.inputs, 1, seed=batch.seed, progress=progress,
                                        **kw, **extra)))
            labels.extend(items[i][1] for i in batch.indices)
            index.extend(batch.indices)
        texts = bool(outs) and isinstance(outs[0], str)
        return SampleResult(labels, None if texts or not outs else np.stack(outs),
                            outs if texts else None, index, inputs.images)
    mine = process_share(args.n, me, count)
    lo, hi = mine.start, mine.stop
    if hi == lo:
        return SampleResult([], None, None, [], inputs.images)
    bar.reset(total=steps * t.runs)
    if preview is not None:
        kw['callback'] = preview(f'proc{me}_' if count > 1 else '', args.seed + lo)
    kw.update(progress=progress, seed=args.seed + lo)
    images, texts = t.outputs(t.call(call, inputs, hi - lo, kw))
    paths = inputs.paths
    labels = [paths[0] if len(paths) == 1 else args.task] * (hi - lo)  # the input, in texts.json
    return SampleResult(labels, images, texts, list(range(lo, hi)), inputs.images)


class Previews:
    """`--preview-every N`: a callback per denoising call that decodes the latents after
    every N-th step and writes them into the run folder: images as one grid
    `preview_<tag>step_010.png`, sentences as `preview_<tag>step_010.txt`."""

    def __init__(self, vd, args, run_dir: Callable[[], str]):
        self.vd, self.args, self.run_dir = vd, args, run_dir
        self.written: List[str] = []

    def __call__(self, tag: str, seed: int) -> Callable:
        """The callback of one call whose samples start at `seed` (sentences decode with
        seed + i, as the call's own outputs)."""

        def callback(step, latents):
            done = int(step) + 1  # grid positions are 0-based
            if done % self.args.preview_every:
                return
            comps = self.vd.components
            base = os.path.join(self.run_dir(), f'preview_{tag}step_{done:03d}')
            if latents.ndim == 2:  # text latents
                texts = comps.decode_latent('text', latents, seed=seed, method=self.args.decode,
                                            temperature=self.args.temperature)
                with open(base + '.txt', 'x') as f:
                    f.write('\n'.join(texts) + '\n')
                self.written.append(base + '.txt')
            else:
                save_png(base + '.png', make_grid(comps.decode_latent('image', latents)),
                         {'step': done, 'task': self.args.task})
                self.written.append(base + '.png')
        return callback


def warn_truncated_prompts(vd, args, prompts) -> None:
    """One warning per over-long prompt the user gave, by its index among the prompts given
    (the pipeline batches and repeats them; its own warnings would name batch positions)."""
    tok = vd.components.tokenizer('clip')
    named = [(f'prompt {i}', p) for i, p in enumerate(prompts)]
    named += [(f'--{k}', getattr(args, k)) for k in ('negative', 'positive') if getattr(args, k)]
    for k, tokens in tok.truncated([p for _, p in named]):
        print(f'warning: {truncation_message(named[k][0], tokens, tok.max_length, named[k][1])}',
              file=sys.stderr)


def sample(vd, t: CliTask, args, prompts, paths, share, run_dir) -> SampleResult:
    """Run the task with a progress bar (this process's share of the samples)."""
    vd.check_task(t.method)
    inputs = TaskInputs(prompts, [load_image(p) for p in paths], paths, list(args.mask))
    previews = None if args.preview_every is None else Previews(vd, args, run_dir)
    if 'ctx_text' in vd.params and share[0] == 0:
        warn_truncated_prompts(vd, args, prompts)
    with progress_bar(args.task) as bar, warnings.catch_warnings():
        warnings.simplefilter('ignore', PromptTruncatedWarning)  # reported above
        result = run_task(vd, t, args, inputs, bar, share=share, preview=previews)
    result.previews = previews
    return result


def schedule_record(vd) -> dict:
    """The checkpoint's schedule (what the model predicts, zero terminal SNR, betas), for
    settings.json: it is read from the config, not chosen by a flag."""
    # lazy: vd_jax.diffusion.schedule pulls in jax, flax (+1.1 s)
    from vd_jax.diffusion.schedule import ScheduleConfig  # noqa: PLC0415
    return ScheduleConfig.coerce(vd.components.config['schedule']).to_dict()


def write(t: CliTask, args, settings, share, run_dir, result: SampleResult):
    """Write this process's outputs (merged into one run folder by process 0 when
    distributed); returns (what `write_results` wrote or None on processes other than 0,
    the sentences)."""
    inputs = None  # hw -> the input image beside the outputs in grid.png
    if result.inputs and t.input_in_grid:
        inputs = functools.partial(load_images, result.inputs[:1])
    images, texts = result.images, result.texts
    if not args.distributed:
        previews = result.previews
        return write_results(
            run_dir(), settings, images=images, texts=texts, labels=result.labels,
            inputs=None if images is None or inputs is None else inputs(images.shape[1:3]),
            elsewhere={'previews': previews.written} if previews else None), texts
    # lazy: jax (+1.0 s)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    write_share(run_dir(), dict(settings, process_index=share[0]), share, result)
    multihost_utils.sync_global_devices('vd_jax sample.py: every share written')
    if share[0] != 0:
        print(f'process {share[0]}: wrote {len(result.index)} output(s) into {run_dir()}')
        return None, texts
    return merge_shares(run_dir(), settings, share, inputs)
