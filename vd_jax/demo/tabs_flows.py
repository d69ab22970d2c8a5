"""The four basic flows' tabs: text->image, image variation, image->text, text variation.

Each calls one public method of `vd_jax.pipeline.VersatileDiffusion`; nothing here samples.
"""
from __future__ import annotations

import streamlit as st

from vd_jax.demo import ui


def text_to_image(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    ui.prompt_examples(tab, tab.examples.prompts)
    with st.form(tab.k('form'), border=False):
        prompt = st.text_area('Text input', key=ui.initial(tab, 'prompt', tab.examples.prompts[0]),
                              disabled=tab.off)
        negative = st.text_input('Negative prompt (optional)', key=tab.k('negative'),
                                 disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run(tab, dict(s, prompt=prompt, negative_prompt=negative),
               lambda progress: tab.vd.text_to_image(
                   [prompt], s['n'], negative_prompt=negative, height=s['height'],
                   width=s['width'], progress=progress, **ui.common_kwargs(s)))
    ui.show_result(tab)


def image_variation(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    with st.form(tab.k('form'), border=False):
        choice = ui.image_input(tab)
        c1, c2, c3 = st.columns(3)
        fidelity = c1.slider('Fidelity (Dislike -- Same)', 0.0, 1.0, 0.0, 0.02, key=tab.k('fidelity'),
                             disabled=tab.off, help='start from the input noised to this level')
        focus = c2.slider('Focus (Semantic -- Style)', 0.0, 1.0, 0.5, 0.02, key=tab.k('focus'),
                          disabled=tab.off)
        color = c3.radio('Color adjustment', ['None', 'Simple'], index=1, key=tab.k('color'),
                         horizontal=True, disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run_with_image(tab, choice, dict(s, fidelity=fidelity, focus=focus, color_adjust=color),
                        lambda image, progress: tab.vd.image_variation(
                            image, s['n'], fidelity=fidelity, focus=focus,
                            color_adjust=color == 'Simple', height=s['height'], width=s['width'],
                            progress=progress, **ui.common_kwargs(s)))
    ui.show_result(tab)


def image_to_text(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    with st.form(tab.k('form'), border=False):
        choice = ui.image_input(tab)
        s = ui.sampling_controls(tab, image_out=False, text_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run_with_image(tab, choice, s, lambda image, progress: tab.vd.image_to_text(
            image, s['n'], decode=s['decode'], temperature=s['temperature'], progress=progress,
            **ui.common_kwargs(s)))
    ui.show_result(tab)


def text_variation(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    ui.prompt_examples(tab, tab.examples.prompts)
    with st.form(tab.k('form'), border=False):
        prompt = st.text_area('Text input', key=ui.initial(tab, 'prompt', tab.examples.prompts[2]),
                              disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=False, text_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run(tab, dict(s, prompt=prompt), lambda progress: tab.vd.text_variation(
            [prompt], s['n'], decode=s['decode'], temperature=s['temperature'], progress=progress,
            **ui.common_kwargs(s)))
    ui.show_result(tab)

