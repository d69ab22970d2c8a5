"""VD-DC: the dual-context model (text->image and image-variation). The image stream has
global, data and image-context layers; the text stream only its text-context layers.

Arg 'tiny' gives the CPU-sized variant.
"""
from configs import common


def get_config(arg=None):
    if arg == 'tiny':
        streams = dict(image=common.tiny_image_stream(), text=common.tiny_text_stream(['context']))
    elif arg in (None, '', 'full'):
        streams = dict(image=common.image_stream(), text=common.text_stream(['context']))
    else:
        raise ValueError(f"vd_dc: unknown arg {arg!r} (use 'tiny' or nothing)")
    return common.wrap(common.model_config(streams, tiny=arg == 'tiny', name='vd_dc'), arg)
