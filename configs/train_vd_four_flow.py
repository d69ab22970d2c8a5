"""Train the four-flow VD (t2i, i2i, i2t, t2t), the last stage.

  python train.py --config configs/train_vd_four_flow.py --workdir runs/vd4 \
      data.kind=encoded data.path=/data/laion_encoded_with_optimus \
      init.sources.smaller.path=runs/vd_dc/export/step_100000

Initialisation: all VD-DC layers from its export (by name); the text data layers (the
FCResBlock stream) start fresh. The data must carry Optimus text latents (`latent_text`),
pre-encoded (`vd_jax.data.preencode`). Arg 'tiny': CPU-sized.
"""
from configs import train_common, vd_four_flow


def get_config(arg=None):
    init = {'smaller': train_common.source('', '*')}
    return train_common.train_config(vd_four_flow.get_config(arg), ['t2i', 'i2i', 'i2t', 't2t'],
                                     arg, init)
