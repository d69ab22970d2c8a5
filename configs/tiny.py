"""The tiny four-flow model (CPU-sized, random weights): what tests and smoke runs use.

Both streams 32 channels, channel_mult [1,2,2], one res block per level, context layers at
the 2nd and 3rd levels, 2 heads, context width 32, text latent width 16, second_dim 4.
"""
from configs import vd_four_flow


def get_config(arg=None):
    return vd_four_flow.get_config('tiny')
