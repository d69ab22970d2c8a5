"""The one vocabulary of logical axis names used by every vd_jax module.

Parameters and activations are annotated with these names (via the factories in
`vd_jax.models.layers`); `vd_jax.sharding` maps them onto mesh axes with rules that
live in the config. Keeping the names in a module without heavy imports lets model
code, configs and the sharding resolver share them.
"""

# Parameter axes.
EMBED = 'embed'          # input features of a dense kernel
MLP = 'mlp'              # output features of a dense kernel (and its bias)
CONV_IN = 'conv_in'      # input channels of a conv kernel
CONV_OUT = 'conv_out'    # output channels of a conv kernel (and its bias)
NORM = 'norm'            # norm scale / bias (small; never worth sharding)
VOCAB = 'vocab'          # embedding tables

# Activation axes.
BATCH = 'batch'
LENGTH = 'length'        # tokens / flattened spatial positions
HEIGHT = 'height'
WIDTH = 'width'
ACT_EMBED = 'act_embed'  # channels / features of activations

ALL = (EMBED, MLP, CONV_IN, CONV_OUT, NORM, VOCAB, BATCH, LENGTH, HEIGHT, WIDTH, ACT_EMBED)
