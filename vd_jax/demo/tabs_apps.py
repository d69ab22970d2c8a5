"""The applications' tabs: dual-guided, multi-context (with masks), disentanglement, I2T2I.

Each calls one public method of `vd_jax.pipeline.VersatileDiffusion`; nothing here samples.
"""
from __future__ import annotations

import streamlit as st

from vd_jax.demo import inputs as inp
from vd_jax.demo import ui
from vd_jax.errors import InputError

LEVELS = ('attention', 'layer', 'model')
MULTI_SLOTS = 4


def dual_guided(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    ui.prompt_examples(tab, tab.examples.prompts[:2])
    with st.form(tab.k('form'), border=False):
        left, right = st.columns(2)
        with left:
            choice = ui.image_input(tab, default=1)
            focus = st.slider('Focus (Semantic -- Style)', 0.0, 1.0, 0.5, 0.02, key=tab.k('focus'),
                              disabled=tab.off)
        with right:
            prompt = st.text_area('Text input', key=ui.initial(tab, 'prompt', tab.examples.prompts[1]),
                                  disabled=tab.off)
            mix = st.slider('Text Domination (NoEffect -- TextOnly)', 0.0, 1.0, 0.5, 0.02,
                            key=tab.k('mix'), disabled=tab.off)
            level = st.radio('Mixing level', LEVELS, key=tab.k('level'), horizontal=True,
                             disabled=tab.off)
            output = st.radio('Output', ['image', 'text'], key=tab.k('output'), horizontal=True,
                              disabled=tab.off, help=tab.served.reason('dual_guided_text'))
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run_with_image(tab, choice, dict(s, prompt=prompt, mix=mix, level=level, focus=focus,
                                          output=output),
                        lambda image, progress: tab.vd.dual_guided(
                            prompt, image, s['n'], mix=mix, level=level, focus=focus,
                            output=output, height=s['height'], width=s['width'],
                            progress=progress, **ui.common_kwargs(s)))
    ui.show_result(tab)


def multi_context(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    with st.form(tab.k('form'), border=False):
        slots = []
        for i, slot_tab in enumerate(st.tabs([f'Image {i + 1}' for i in range(MULTI_SLOTS)])):
            with slot_tab:
                use = st.checkbox('Use this image', i < 2, key=tab.k(f'use{i}'), disabled=tab.off)
                choice = ui.image_input(tab, f'image{i}', default=i % len(tab.examples.images))
                c1, c2 = st.columns(2)
                weight = c1.slider('Weight', 0.0, 1.0, 1.0, 0.02, key=tab.k(f'weight{i}'),
                                   disabled=tab.off)
                focus = c2.slider('Focus (Semantic -- Style)', 0.0, 1.0, 0.5, 0.02,
                                  key=tab.k(f'focus{i}'), disabled=tab.off)
                m1, m2 = st.columns(2)
                preset = m1.selectbox('Mask: region to use', inp.MASK_PRESETS, key=tab.k(f'mask{i}'),
                                      disabled=tab.off)
                mask_up = m2.file_uploader('... or a mask image (white = use)', type=inp.EXTENSIONS,
                                           key=tab.k(f'mask{i}_upload'), disabled=tab.off)
                slots.append((use, choice, weight, focus, preset, mask_up))
        prompt = st.text_area('Text input (optional)', key=tab.k('prompt'), disabled=tab.off)
        text_strength = st.slider('Text Domination (NoEffect -- TextOnly)', 0.0, 1.0, 0.0, 0.02,
                                  key=tab.k('text_strength'), disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if not go:
        ui.show_result(tab)
        return
    images, names, weights, focuses, masks, mask_names = [], [], [], [], [], []
    try:
        for use, choice, weight, focus, preset, mask_up in slots:
            if not use:
                continue
            image, name = choice.resolve(tab.limits)
            if mask_up is not None:
                mask, mask_name = inp.decode_mask(mask_up.getvalue(), mask_up.name, tab.limits), mask_up.name
            else:
                mask, mask_name = inp.preset_mask(preset), preset
            images.append(image), names.append(name), weights.append(weight)
            focuses.append(focus), masks.append(mask), mask_names.append(mask_name)
        if not images:
            raise InputError('tick "Use this image" for at least one image')
    except (InputError, KeyError) as e:
        st.error(str(e), icon=':material/error:')
    else:
        use_masks = None if all(m is None for m in masks) else masks
        ui.run(tab, dict(s, images=names, strengths=weights, focus=focuses, masks=mask_names,
                         prompt=prompt, text_strength=text_strength),
               lambda progress: tab.vd.multi_context(
                   images, weights, prompt or None, s['n'], text_strength=text_strength,
                   masks=use_masks, focus=focuses, height=s['height'], width=s['width'],
                   progress=progress, **ui.common_kwargs(s)), inputs=images)
    ui.show_result(tab)


def disentangle(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    with st.form(tab.k('form'), border=False):
        choice = ui.image_input(tab, default=2)
        c1, c2, c3 = st.columns(3)
        mode = c1.radio('Control', ['focus (v1.0 demo)', 'level (paper)'], key=tab.k('mode'),
                        disabled=tab.off)
        focus = c2.slider('Focus (Semantic -- Style)', 0.0, 1.0, 1.0, 0.02, key=tab.k('focus'),
                          disabled=tab.off)
        level = c3.select_slider('Disentangle level (Semantic -2 .. Style +2)', [-2, -1, 0, 1, 2],
                                 value=2, key=tab.k('level'), disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if go:
        kw = dict(focus=focus) if mode.startswith('focus') else dict(level=int(level))
        ui.run_with_image(tab, choice, dict(s, **kw),
                        lambda image, progress: tab.vd.disentangle(
                            image, s['n'], height=s['height'], width=s['width'],
                            progress=progress, **kw, **ui.common_kwargs(s)))
    ui.show_result(tab)


def i2t2i(tab: ui.Tab) -> None:
    ui.unavailable_notice(tab)
    with st.form(tab.k('form'), border=False):
        choice = ui.image_input(tab, default=0)
        c1, c2, c3 = st.columns(3)
        positive = c1.text_input('Add (positive prompt)', key=ui.initial(tab, 'positive', 'a lighthouse'),
                                 disabled=tab.off)
        negative = c2.text_input('Remove (negative prompt)', key=ui.initial(tab, 'negative', 'the sun'),
                                 disabled=tab.off)
        weight = c3.slider('Image weight', 0.0, 1.0, 0.33, 0.01, key=tab.k('image_weight'),
                           disabled=tab.off)
        s = ui.sampling_controls(tab, image_out=True)
        go = ui.run_button(tab)
    if go:
        ui.run_with_image(tab, choice, dict(s, positive=positive, negative=negative, image_weight=weight),
                          lambda image, progress: tab.vd.i2t2i(
                              image, positive, negative, s['n'], image_weight=weight,
                              height=s['height'], width=s['width'], progress=progress,
                              **ui.common_kwargs(s)),
                          split=lambda out: (out[1], out[0]))
    ui.show_result(tab)
