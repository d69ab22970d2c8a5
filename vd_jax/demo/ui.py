"""Widgets every tab shares: sampling controls, image inputs, the queued run, the results.

Each tab is one `st.form` (its values go to the server together when "Run" is pressed), so
changing a control never starts work; results live in the session state and stay on the
page (with their zip download) while other tabs run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import streamlit as st

from vd_jax.demo import inputs as inp, lora_panel
from vd_jax.demo.inputs import Limits
from vd_jax.demo.model import Served
from vd_jax.demo.results import Result, png_bytes
from vd_jax.diffusion.sampling import SAMPLERS, SPACINGS
from vd_jax.errors import InputError
from vd_jax.outputs import code_version

log = logging.getLogger('vd_jax.demo')

DECODE_METHODS = ('sample', 'greedy', 'beam')
# The original demo's settings: seed 20, two samples, 50 DDIM steps, and guidance 7.5 unless
# the served model recommends another scale (`VersatileDiffusion.sampling_defaults`)
DEFAULT_SEED, DEFAULT_N, DEFAULT_STEPS = 20, 2, 50


@dataclasses.dataclass
class Tab:
    """What a tab's code needs: the shared model, upload limits, its key and availability."""
    served: Served
    limits: Limits
    key: str                  # widget-key prefix, also the results container key
    task: str                 # the pipeline task (for `settings.json`)
    reason: Optional[str]     # why the model cannot serve this tab, or None

    @property
    def off(self) -> bool:
        return self.reason is not None

    @property
    def vd(self):
        return self.served.vd

    @property
    def examples(self):
        """The served model's example prompts and images (demo.inputs.Examples)."""
        return self.served.examples

    def k(self, name: str) -> str:
        return f'{self.key}_{name}'


def initial(tab: Tab, name: str, value) -> str:
    """A widget's key with its first value put in the session state (not passed to the
    widget, so that example buttons may change it without Streamlit's double-default warning)."""
    st.session_state.setdefault(tab.k(name), value)
    return tab.k(name)


def unavailable_notice(tab: Tab) -> None:
    if tab.off:
        st.warning(f'This model cannot run this tab: {tab.reason}', icon=':material/block:')


def sampling_controls(tab: Tab, *, image_out: bool, text_out: bool = False,
                      n: bool = True) -> Dict[str, Any]:
    """Seed, samples, steps, guidance scale, sampler, eta, step grid, Karras grid, guidance
    rescale (+ size or text decoding). The model's schedule and prediction type come from its
    checkpoint config, not from the page."""
    c1, c2, c3, c4 = st.columns(4)
    s = dict(seed=int(c1.number_input('Seed', 0, 2 ** 31 - 1 - 64, DEFAULT_SEED, key=tab.k('seed'),
                                      disabled=tab.off)))
    if n:
        s['n'] = int(c2.number_input('Samples', 1, 8, DEFAULT_N, key=tab.k('n'), disabled=tab.off))
    s['steps'] = int(c3.number_input('Steps', 1, 1000, DEFAULT_STEPS, key=tab.k('steps'),
                                     disabled=tab.off))
    scale = float(tab.vd.sampling_defaults['scale'])
    s['scale'] = float(c4.number_input('Guidance scale', 0.0, 50.0, scale, 0.5,
                                       key=tab.k('scale'), disabled=tab.off))
    with st.expander('Sampler and size'):
        a1, a2, a3, a4 = st.columns(4)
        s['sampler'] = a1.selectbox('Sampler', SAMPLERS, key=tab.k('sampler'), disabled=tab.off)
        s['eta'] = float(a2.number_input('DDIM eta', 0.0, 1.0, 0.0, 0.1, key=tab.k('eta'),
                                         disabled=tab.off))
        if image_out:
            side = int(tab.vd.image_size)
            s['height'] = int(a3.number_input('Height', 8, 2048, side, 8, key=tab.k('height'),
                                              disabled=tab.off))
            s['width'] = int(a4.number_input('Width', 8, 2048, side, 8, key=tab.k('width'),
                                             disabled=tab.off))
        if text_out:
            s['decode'] = a3.selectbox('Text decoding', DECODE_METHODS, key=tab.k('decode'),
                                       disabled=tab.off, help='Optimus decoding; the original samples')
            s['temperature'] = float(a4.number_input('Temperature', 0.05, 5.0, 1.0, 0.05,
                                                     key=tab.k('temperature'), disabled=tab.off))
        b1, b2, b3 = st.columns([1, 1, 2])
        s['spacing'] = b1.selectbox(
            'Step grid', SPACINGS, key=tab.k('spacing'), disabled=tab.off,
            help="auto: the original DDIM grid (dpm++: linspace); trailing starts at the last "
                 'timestep, for models trained with zero terminal SNR')
        s['karras'] = bool(b2.checkbox('Karras sigmas', False, key=tab.k('karras'),
                                       disabled=tab.off, help='the Karras et al. grid (dpm++ only)'))
        s['guidance_rescale'] = float(b3.slider(
            'Guidance rescale', 0.0, 1.0, 0.0, 0.05, key=tab.k('guidance_rescale'),
            disabled=tab.off, help='phi of Lin et al. 2023 (0 = off); ~0.7 against the '
                                   'over-exposure of high guidance with zero terminal SNR'))
    return s


def common_kwargs(s: Dict[str, Any]) -> Dict[str, Any]:
    """The pipeline keywords every task takes."""
    return {k: s[k] for k in ('steps', 'scale', 'sampler', 'eta', 'seed', 'spacing', 'karras',
                              'guidance_rescale')}


@dataclasses.dataclass
class ImageChoice:
    upload: Any           # Streamlit UploadedFile or None
    example: str

    def resolve(self, limits: Limits):
        """-> (uint8 (H, W, 3), name). An upload wins; without one the chosen example."""
        if self.upload is not None:
            return inp.decode_image(self.upload.getvalue(), self.upload.name, limits), self.upload.name
        return inp.example_image(self.example), f'example:{self.example}'


def image_input(tab: Tab, name: str = 'image', label: str = 'Image input',
                default: int = 0) -> ImageChoice:
    mb = max(1, math.ceil(tab.limits.max_bytes / 2 ** 20))
    up = st.file_uploader(f'{label} (PNG, JPEG, WebP, BMP, GIF; at most {mb} MB)',
                          type=inp.EXTENSIONS, key=tab.k(f'{name}_upload'),
                          max_upload_size=mb, disabled=tab.off)
    ex = st.selectbox('... or an example image (used when nothing is uploaded)', tab.examples.images,
                      index=default, key=tab.k(f'{name}_example'), disabled=tab.off)
    return ImageChoice(up, ex)


def prompt_examples(tab: Tab, prompts: Sequence[str], widget: str = 'prompt') -> None:
    """Buttons that fill the tab's prompt box (outside the form: they change nothing else)."""
    def fill(text):
        st.session_state[tab.k(widget)] = text
    cols = st.columns(len(prompts))
    for i, (c, p) in enumerate(zip(cols, prompts)):
        c.button(p, key=tab.k(f'example_{widget}_{i}'), on_click=fill, args=(p,),
                 disabled=tab.off, type='tertiary', icon=':material/edit_note:')


def run_button(tab: Tab) -> bool:
    return st.form_submit_button('Run', key=tab.k('run'), type='primary', disabled=tab.off)


def run(tab: Tab, settings: Dict[str, Any], call: Callable[[Callable], Any],
        inputs: Sequence[np.ndarray] = (), split: Optional[Callable] = None) -> None:
    """Run `call(progress)` on the shared model, one request at a time, with a progress bar.

    `split(out)` turns the call's return into (images, texts); by default an array is
    images and a list is texts. Errors (bad inputs or settings) become a message in the page.
    """
    status, bar = st.empty(), st.empty()
    lock = tab.served.lock
    if not lock.acquire(blocking=False):
        status.info('Queued: another request is running; this one starts when it is done.',
                    icon=':material/hourglass_top:')
        lock.acquire()
    try:
        loras = lora_panel.apply(tab.served)  # this session's adapter scales
        if loras:
            settings = dict(settings, lora=loras)
        status.info('Running (the first request of a new shape, step count or sampler also '
                    'compiles its sampler).', icon=':material/play_circle:')
        stage = {'n': 1, 'last': 0}

        def progress(done: int, total: int) -> None:
            if done < stage['last']:  # a task with several sampling runs (i2t2i) started the next
                stage['n'] += 1
            stage['last'] = done
            bar.progress(done / max(total, 1), text=f"sampling run {stage['n']}: step {done}/{total}")

        t0 = time.time()
        out = call(progress)
        seconds = time.time() - t0
    except Exception as e:  # every failure is a message in the page; the server keeps serving
        expected = isinstance(e, (InputError, ValueError, KeyError, FileNotFoundError))
        if not expected:
            log.exception('request failed: %s', settings)
        status.error(f'{e}' if expected else f'The request failed: {type(e).__name__}: {e}',
                     icon=':material/error:')
        bar.empty()
        return
    finally:
        lock.release()
    images, texts = split(out) if split else ((out, None) if isinstance(out, np.ndarray) else (None, out))
    vd = tab.vd
    settings = dict(settings, task=tab.task, checkpoint=vd.source, untrained=tab.served.untrained,
                    dtype=tab.served.dtype, uncond=vd.uncond, code_version=code_version())
    st.session_state[tab.k('result')] = Result(settings, images=images, texts=texts,
                                               inputs=list(inputs), seconds=seconds)
    status.empty()
    bar.empty()


def run_with_image(tab: Tab, choice: ImageChoice, settings: Dict[str, Any], call: Callable,
                   split: Optional[Callable] = None) -> None:
    """Decode the input image first (a bad upload is reported before any model work), then
    `run` with `call(image, progress)`."""
    try:
        image, name = choice.resolve(tab.limits)
    except (InputError, KeyError) as e:
        st.error(str(e), icon=':material/error:')
        return
    run(tab, dict(settings, image=name), lambda progress: call(image, progress), inputs=[image],
        split=split)


def show_result(tab: Tab) -> None:
    """The last result of this tab in this session: inputs, outputs, settings and a zip."""
    res: Optional[Result] = st.session_state.get(tab.k('result'))
    if res is None:
        return
    if res.inputs:
        with st.container(key=tab.k('inputs')):
            st.caption('Inputs')
            st.image([inp_png(a) for a in res.inputs], width='content', output_format='PNG')
    with st.container(key=tab.k('outputs')):
        if res.images is not None:
            seed = res.settings.get('seed', 0)  # sample i of a call is seeded with seed + i
            captions = None if tab.task == 'i2t2i' else [f'seed {seed + i}' for i in range(len(res.images))]
            st.image(res.pngs, caption=captions, width='content',
                     output_format='PNG')  # 'auto' would serve lossy JPEG
        for t in res.texts or []:
            st.text(t)
    st.caption(f"{res.seconds:.1f} s · {res.settings['checkpoint']}"
               + (' · UNTRAINED model: outputs are noise' if res.settings['untrained'] else ''))
    st.download_button('Download outputs + settings (zip)', res.zip, key=tab.k('download'),
                       file_name=f"vd_{tab.key}_seed{res.settings.get('seed', 0)}.zip",
                       mime='application/zip', on_click='ignore', icon=':material/download:')
    with st.expander('Settings'):
        st.json(res.settings, expanded=True)


def inp_png(a: np.ndarray) -> bytes:
    return png_bytes(np.asarray(a))
