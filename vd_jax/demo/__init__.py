"""The Versatile Diffusion web demo: `python -m vd_jax.demo [--ckpt DIR]`.

One tab per task (text->image, image variation, image->text, text variation, dual-guided,
multi-context with masks, disentanglement, I2T2I), each calling the public methods of
`vd_jax.pipeline.VersatileDiffusion`. Needs the `demo` extra: `pip install -e '.[demo]'`
(Streamlit; Gradio cannot be installed with this project's pillow pin).

Modules: `model` (the shared instance of the model `vd_jax.cli.model_flags.load_model`
chooses), `options` (command line), `inputs` (upload limits, safe decoding, examples), `results`
(PNGs, the zip), `ui` (shared widgets, the queued run), `tabs_flows`, `tabs_apps`, `app`
(the page).
"""
