"""LoRA for the Versatile Diffusion diffuser: train, share and load small adapters.

    vd = VersatileDiffusion.default()
    vd.load_lora('star.safetensors', scale=1.0)          # name 'star'; several can be loaded
    vd.set_lora_scale('star', 0.5)                        # no recompile (a traced value)
    vd.lora_mode = 'on_the_fly'                           # default 'merge' (the fast path)
    vd.unload_lora()                                      # the base model again

Training: a train config with a `lora` section (configs/train_lora_vd_mini.py) trains only the
adapters on the frozen, sharded base (`vd_jax.lora.training`) and exports one small
safetensors file that carries its own settings. diffusers/PEFT LoRA files of an SD-style UNet
load too (`vd_jax.lora.peft_import`). docs/lora.md has a worked example.

Modules: `adapters` (targets, files, merging), `apply` (the on-the-fly path), `stack`
(adapters loaded into a model), `peft_import`, `training`, `teach_shape` (the worked example).
"""
from vd_jax.lora import peft_import
from vd_jax.lora.adapters import (DEFAULT_TARGETS, Adapter, LoraSpec, merge, read_adapter,  # noqa: F401
                                  save_adapter, select_targets)


def import_peft(path_or_state, diffuser_config, **kw):
    """A diffusers/PEFT LoRA (file or state dict) as an `Adapter` of this diffuser
    (`vd_jax.lora.peft_import.import_state_dict`)."""
    if isinstance(path_or_state, str):
        return peft_import.read_peft_file(path_or_state, diffuser_config, **kw)
    return peft_import.import_state_dict(path_or_state, diffuser_config, **kw)
