"""The Streamlit page: a header and one tab per task (run by `python -m vd_jax.demo`).

Streamlit runs this script for each page view and each "Run"; the model is not loaded here
but shared (`vd_jax.demo.model.get_served`), so every session reuses its compiled samplers.
"""
from __future__ import annotations

import os
import sys

import streamlit as st

from vd_jax.demo import inputs, lora_panel, model, options, tabs_apps, tabs_flows, ui

# Streamlit puts the script's folder first on sys.path (for scripts that import their
# neighbours); this package is imported as vd_jax.demo.*, and its module names (model,
# options, ui, ...) must not shadow top-level packages, so the folder is taken off again.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != _HERE]

# (tab title, widget-key prefix, pipeline task, the tab's code)
TABS = (
    ('Text-to-Image', 't2i', 'text_to_image', tabs_flows.text_to_image),
    ('Image-Variation', 'i2i', 'image_variation', tabs_flows.image_variation),
    ('Image-to-Text', 'i2t', 'image_to_text', tabs_flows.image_to_text),
    ('Text-Variation', 't2t', 'text_variation', tabs_flows.text_variation),
    ('Dual-Context', 'dual', 'dual_guided', tabs_apps.dual_guided),
    ('Multi-Context Blender', 'multi', 'multi_context', tabs_apps.multi_context),
    ('Disentanglement', 'dis', 'disentangle', tabs_apps.disentangle),
    ('I2T2I Editor', 'i2t2i', 'i2t2i', tabs_apps.i2t2i),
)

# Small outputs (the tiny model's 32 x 32) are shown enlarged with sharp pixels; the files
# served and downloaded are the exact outputs.
_CSS = '''<style>
[class*="_outputs"] img, [class*="_inputs"] img {min-width: 160px; image-rendering: pixelated;}
</style>'''


def main() -> None:
    args = options.current()
    st.set_page_config(page_title='Versatile Diffusion · vd_jax', layout='wide')
    st.html(_CSS)
    served = model.get_served(args.ckpt, config=args.config, seed=args.seed_model, dtype=args.dtype,
                              loras=args.lora)
    lora_panel.sidebar(served)
    st.title('Versatile Diffusion')
    st.caption('Text, images and variations all in one diffusion model (Xu et al., '
               'arXiv 2211.08332), in JAX/Flax. Model: '
               f'`{served.vd.source}` · {served.dtype} · requests run one at a time.')
    if served.untrained:
        st.info('This model has **random, untrained weights**: every tab runs the real '
                'pipeline, but the outputs are noise. Start without `--config` for the shipped '
                'VD-mini, or with `--ckpt DIR` for a converted or trained model.',
                icon=':material/science:')
    elif served.examples is inputs.SHAPES_EXAMPLES:
        st.info('This model was trained only on a world of **single coloured shapes** (64×64 '
                'px; VD-mini, docs/vd-mini.md): ask for a shape (circle, square, triangle, '
                'cross), a colour, a size, a position and a background, as in the examples. '
                'Anything else is outside what it has seen.', icon=':material/category:')
    titles = [title if served.reason(task) is None else f'{title} (unavailable)'
              for title, _, task, _ in TABS]
    limits = options.limits(args)
    for (_, key, task, render), container in zip(TABS, st.tabs(titles, key='tasks')):
        with container:
            render(ui.Tab(served, limits, key, task, served.reason(task)))


main()
