"""Model families, all behind one interface.

Every family (`FAMILIES`) gives
  Config.from_dict(section)           a frozen dataclass from its config section (the original's
                                      or HF's argument names)
  Module(config, dtype=, param_dtype=)  the linen network; `Module.init_all(batch)` touches
                                      every parameter
  example_inputs(config, batch=1)     arrays for `Module.__call__`
and `vd_jax.models.init.abstract_params(module)` (shapes, no allocation), `init_params`
(the modules' initialisers) and `random_params` (quick numpy weights) work on any of them.

  family        Config             Module            what it is
  diffuser      DiffuserConfig     Diffuser          VD's grouped multi-stream diffuser
  autokl        AutoKLConfig       AutoencoderKL     the image VAE (SD kl-f8)
  optimus       OptimusConfig      Optimus           the text VAE (BERT -> latent -> GPT-2)
  clip_text     CLIPTextConfig     CLIPTextContext   CLIP text tower -> all-token context
  clip_vision   CLIPVisionConfig   CLIPImageContext  CLIP vision tower -> all-token context
  fid_inception InceptionConfig    InceptionV3       the FID network (pool3 features); used by
                                                    `vd_jax.eval.fid`, never a checkpoint part
Which family serves which checkpoint part is decided by `vd_jax.modalities`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import jax.numpy as jnp

from vd_jax.models import clip, inception, optimus, unet, vae
from vd_jax.models.diffuser_config import DiffuserConfig, StreamConfig, plan_stream  # noqa: F401
from vd_jax.models.unet import Diffuser  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its config class, module class and example inputs."""
    name: str
    config: Any                      # class with `from_dict(section)`
    module: Any                      # linen Module class taking (config, dtype=, param_dtype=)
    example_inputs: Callable         # (config, batch=1) -> tuple of arrays for __call__

    def make_config(self, section):
        return section if isinstance(section, self.config) else self.config.from_dict(section)

    def build(self, section, *, dtype=jnp.float32, param_dtype=jnp.float32, **kw):
        """The module for a config section (dict/ConfigDict or a ready Config)."""
        return self.module(self.make_config(section), dtype=dtype, param_dtype=param_dtype, **kw)


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family('diffuser', unet.DiffuserConfig, unet.Diffuser, unet.example_inputs),
    Family('autokl', vae.AutoKLConfig, vae.AutoencoderKL, vae.example_inputs),
    Family('optimus', optimus.OptimusConfig, optimus.Optimus, optimus.example_inputs),
    Family('clip_text', clip.CLIPTextConfig, clip.CLIPTextContext, clip.text_example_inputs),
    Family('clip_vision', clip.CLIPVisionConfig, clip.CLIPImageContext,
           clip.vision_example_inputs),
    Family('fid_inception', inception.InceptionConfig, inception.InceptionV3,
           inception.example_inputs),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family '{name}' (known: {sorted(FAMILIES)})")
    return FAMILIES[name]


def register_family(fam: Family) -> None:
    """Add a model family (a new modality's VAE or context encoder)."""
    FAMILIES[fam.name] = fam
