"""Train VD-DC: text->image and image variation (flows t2i, i2i), the second stage.

  python train.py --config configs/train_vd_dc.py --workdir runs/vd_dc \
      data.kind=encoded data.path=/data/laion_encoded \
      init.sources.smaller.path=runs/vd_basic/export/step_100000 \
      init.sources.sd_text_context.path=/models/sd-v1-5/unet

Initialisation: everything VD-basic has (copied by name: time embedding, image data and
image-context layers) from its export; the new text-context layers from SD's cross-attention
layers (SD attends to CLIP text, so its cross-attention is a text-context layer). The init
report (workdir/init_report.json) lists what came from where. Arg 'tiny': CPU-sized.
"""
from configs import train_common, vd_dc


def get_config(arg=None):
    init = {'smaller': train_common.source('', '*'),
            'sd_text_context': train_common.source('', train_common.SD_TEXT_CONTEXT_MAP)}
    return train_common.train_config(vd_dc.get_config(arg), ['t2i', 'i2i'], arg, init)
