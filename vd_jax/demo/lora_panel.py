"""The demo's LoRA panel: the adapters the served model has loaded, one scale slider each.

Adapters are loaded at start (`python -m vd_jax.demo --lora PATH[:SCALE]`, repeatable). Each
browser session keeps its own slider values; a request applies them to the shared model
inside the request lock (`apply`), so sessions never see each other's scales. A scale change
re-merges the adapters (a traced value: nothing recompiles).
"""
from __future__ import annotations

from typing import Dict

import streamlit as st

SCALE_RANGE = (-1.0, 2.0)


def _key(name: str) -> str:
    return f'lora_scale_{name}'


def loaded(served) -> Dict[str, float]:
    """{name: scale at load} of the served model's adapters."""
    return dict(served.lora_defaults) if getattr(served, 'lora_defaults', None) else {}


def sidebar(served) -> None:
    """The panel (nothing when no adapter is loaded)."""
    adapters = loaded(served)
    if not adapters:
        return
    side = st.sidebar
    side.subheader('LoRA adapters')
    side.caption('Added to the diffuser for every tab (scale 0: off).')
    stack = served.vd.components.adapters
    for name, default in adapters.items():
        st.session_state.setdefault(_key(name), float(default))
        side.slider(name, SCALE_RANGE[0], SCALE_RANGE[1], step=0.05, key=_key(name),
                    help=f'{stack.sources.get(name, "")}')


def apply(served) -> Dict[str, float]:
    """Set this session's scales on the shared model (call while holding its lock); returns
    {name: scale} for the request's settings."""
    adapters = loaded(served)
    scales = {n: float(st.session_state.get(_key(n), s)) for n, s in adapters.items()}
    for n, s in scales.items():
        served.vd.set_lora_scale(n, s)
    return scales
