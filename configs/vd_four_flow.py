"""The released four-flow Versatile Diffusion (`vd_four_flow_v1-0`, 2,566,318,852 diffuser
parameters): text->image, image-variation, image->text, text-variation.

Convert the released weights:
  python -m vd_jax.convert vd-four-flow-v1-0-fp16.pth converted/vd4 --config vd_four_flow
Arg 'tiny' gives the CPU-sized variant used by tests and smoke runs.
"""
from configs import common


def get_config(arg=None):
    if arg == 'tiny':
        streams = dict(image=common.tiny_image_stream(), text=common.tiny_text_stream())
    elif arg in (None, '', 'full'):
        streams = dict(image=common.image_stream(), text=common.text_stream())
    else:
        raise ValueError(f"vd_four_flow: unknown arg {arg!r} (use 'tiny' or nothing)")
    return common.wrap(common.model_config(streams, tiny=arg == 'tiny', name='vd_four_flow'), arg)
