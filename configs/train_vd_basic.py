"""Train VD-basic: image variation only (flow i2i), the first stage of VD's progressive training.

  python train.py --config configs/train_vd_basic.py --workdir runs/vd_basic \
      data.kind=encoded data.path=/data/laion_encoded \
      init.sources.sd.path=/models/sd-v1-5/unet \
      init.sources.sd_variation.path=/models/sd-image-variations/unet

Initialisation (paper; UNVERIFIED: VD's training code was never released): the time embedding
and image data layers from SD, the image-context layers from SD-variation (both converted on
the fly). Arg 'tiny' gives the CPU-sized model. Hyper-parameters: labelled defaults of
`configs/train_common.py`.
"""
from configs import train_common, vd_basic


def get_config(arg=None):
    init = {'sd': train_common.source('', train_common.SD_MAP),
            'sd_variation': train_common.source('', train_common.SD_VARIATION_MAP)}
    return train_common.train_config(vd_basic.get_config(arg), ['i2i'], arg, init)
