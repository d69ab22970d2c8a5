"""VD-basic: image-variation only (image stream with global, data and image-context layers).

Arg 'tiny' gives the CPU-sized variant.
"""
from configs import common


def get_config(arg=None):
    if arg == 'tiny':
        streams = dict(image=common.tiny_image_stream())
    elif arg in (None, '', 'full'):
        streams = dict(image=common.image_stream())
    else:
        raise ValueError(f"vd_basic: unknown arg {arg!r} (use 'tiny' or nothing)")
    return common.wrap(common.model_config(streams, tiny=arg == 'tiny', name='vd_basic'), arg)
