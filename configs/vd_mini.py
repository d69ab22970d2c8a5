"""VD-mini: the whole Versatile Diffusion at a size this repository trains from nothing on CPU,
on the generated shapes world (`vd_jax.data.shapes`, 64x64 images with captions).

Same architecture as the released model, every width smaller: an f=4 AutoKL (64x64x3 ->
16x16x4), CLIP towers of width 64 on 64x64 images (patch 8: 65 tokens) and on 24 BPE tokens,
an Optimus of width 48/64 with a 32-d latent, and a diffuser of width 32 whose image and text
streams share one layer order (context layers at the 8x8 and 4x4 levels). The real CLIP BPE,
BERT and GPT-2 vocabularies are kept, so prompts stay plain strings.

Arg: None / 'four_flow' (the shipped model), 'dc' (VD-DC: t2i + i2i), 'basic' (VD-basic: i2i):
the progressive settings of the paper, each initialised from the previous one's export.
"""
from configs import common

CONTEXT_DIM = 64
LATENT_TEXT = 32
IMAGE_SIZE = 64


def image_stream(parts=('global', 'data', 'context')):
    return dict(kind='2d', parts=list(parts), in_channels=4, out_channels=4, model_channels=32,
                attention_resolutions=[2, 4], num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
                num_heads=4, num_head_channels=None, context_dim=CONTEXT_DIM,
                use_checkpoint=False)


def text_stream(parts=('data', 'context')):
    return dict(kind='0d', parts=list(parts), input_channels=LATENT_TEXT,
                output_channels=LATENT_TEXT, model_channels=32, num_noattn_blocks=[1, 1, 1],
                channel_mult=[1, 2, 2], second_dim=[4, 4, 4], with_attn=[False, True, True],
                num_heads=4, num_head_channels=None, context_dim=CONTEXT_DIM,
                use_checkpoint=False)


def sections():
    """The VAE and context-encoder sections of VD-mini (family name -> section)."""
    autokl = dict(embed_dim=4, double_z=True, z_channels=4, resolution=IMAGE_SIZE, in_channels=3,
                  out_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
                  dropout=0.0, norm_groups=8)  # 4 channels per group (see AutoKLConfig)
    clip_text = dict(vocab_size=49408, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                     hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=CONTEXT_DIM,
                     eos_token_id=49407)
    clip_vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8,
                       num_channels=3, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                       projection_dim=CONTEXT_DIM)
    enc = dict(vocab_size=28996, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, max_position_embeddings=32, type_vocab_size=2,
               layer_norm_eps=1e-12)
    dec = dict(vocab_size=50260, n_positions=32, n_embd=64, n_layer=2, n_head=4,
               layer_norm_epsilon=1e-5)
    optimus = dict(latent_size=LATENT_TEXT, encoder=enc, decoder=dec, max_length=24,
                   max_wordpieces=24)
    return {'autokl': autokl, 'clip_text': clip_text, 'clip_vision': clip_vision,
            'optimus': optimus}


def get_config(arg=None):
    if arg in (None, '', 'four_flow'):
        streams = dict(image=image_stream(), text=text_stream())
    elif arg == 'dc':
        streams = dict(image=image_stream(), text=text_stream(['context']))
    elif arg == 'basic':
        streams = dict(image=image_stream())
    else:
        raise ValueError(f"vd_mini: unknown arg {arg!r} (use 'basic', 'dc' or nothing)")
    model = common.model_config(streams, name=f"vd_mini{'_' + arg if arg else ''}",
                                image_size=IMAGE_SIZE, sections=sections())
    return common.wrap(model, arg)
