"""Sections shared by the model configs: the original model arguments, written down.

Field names mirror the original constructors (SHI-Labs `configs/model/*.yaml`), so any
original config can be transcribed. Each stream carries `kind`: '2d' for
`openai_unet_2d_next` (image ResBlocks), '0d' for `openai_unet_0d_next` (text FCBlocks).
"""
import ml_collections


def image_stream(parts=('global', 'data', 'context')):
    """`openai_unet_2d_v1` (configs/model/openai_unet.yaml:5-17)."""
    return dict(kind='2d', parts=list(parts), in_channels=4, out_channels=4,
                model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], num_heads=8,
                num_head_channels=None, context_dim=768, use_checkpoint=True)


def text_stream(parts=('data', 'context')):
    """`openai_unet_0d_v1_dc` (configs/model/openai_unet.yaml:53-66, 93-96)."""
    return dict(kind='0d', parts=list(parts), input_channels=768, output_channels=768,
                model_channels=320, num_noattn_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                second_dim=[4, 4, 4, 4], with_attn=[True, True, True, False], num_heads=8,
                num_head_channels=None, context_dim=768, use_checkpoint=True)


def tiny_image_stream(parts=('global', 'data', 'context')):
    """CPU-sized image stream: 32 channels, mult [1,2,2], context layers at levels 2 and 3."""
    return dict(kind='2d', parts=list(parts), in_channels=4, out_channels=4, model_channels=32,
                attention_resolutions=[2, 4], num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
                num_heads=2, num_head_channels=None, context_dim=32, use_checkpoint=False)


def tiny_text_stream(parts=('data', 'context')):
    """CPU-sized text stream: latent width 16, second_dim 4, same layer order as the image one."""
    return dict(kind='0d', parts=list(parts), input_channels=16, output_channels=16,
                model_channels=32, num_noattn_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
                second_dim=[4, 4, 4], with_attn=[False, True, True], num_heads=2,
                num_head_channels=None, context_dim=32, use_checkpoint=False)


def autokl(tiny=False):
    """`autokl_v1` (configs/model/autokl.yaml:5-22): the SD kl-f8 AutoencoderKL (`ddconfig` names)."""
    if tiny:
        return dict(embed_dim=4, double_z=True, z_channels=4, resolution=32, in_channels=3,
                    out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                    dropout=0.0)
    return dict(embed_dim=4, double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def clip_text(tiny=False):
    """`clip_text_context_encoder`: the text tower of openai/clip-vit-large-patch14 (HF names)."""
    if tiny:
        return dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, hidden_act='quick_gelu',
                    layer_norm_eps=1e-5, projection_dim=32, eos_token_id=49407)
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
                layer_norm_eps=1e-5, projection_dim=768, eos_token_id=49407)


def clip_vision(tiny=False):
    """`clip_image_context_encoder`: the vision tower of openai/clip-vit-large-patch14 (HF names)."""
    if tiny:
        return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=2, num_channels=3, hidden_act='quick_gelu',
                    layer_norm_eps=1e-5, projection_dim=32)
    return dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=14, num_channels=3,
                hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=768)


def optimus(tiny=False):
    """`optimus_v1` (configs/model/optimus.yaml): BERT-base-cased encoder, GPT-2 decoder.

    Read by `vd_jax.models.optimus.OptimusConfig.from_dict`: `encoder` takes BertConfig
    names, `decoder` GPT-2 names (the original's dropouts etc. are accepted and ignored),
    `max_length` is the decoding limit counting <BOS> and <EOS> (optimus.py decode: 30).
    The tiny variant keeps the real vocabularies (so the real tokenizers work with it),
    width 32 and latent 16 (= the tiny text diffuser stream's input_channels).
    """
    if tiny:
        enc = dict(vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=512, type_vocab_size=2,
                   layer_norm_eps=1e-12)
        dec = dict(vocab_size=50260, n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                   layer_norm_epsilon=1e-5)
        return dict(latent_size=16, encoder=enc, decoder=dec, max_length=30)
    enc = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
               layer_norm_eps=1e-12)
    dec = dict(vocab_size=50260, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
               layer_norm_epsilon=1e-5)
    return dict(latent_size=768, encoder=enc, decoder=dec, max_length=30)


def schedule():
    """`vd_base` (configs/model/vd.yaml): the DDPM schedule of every VD model."""
    return dict(beta_linear_start=0.00085, beta_linear_end=0.012, timesteps=1000,
                # the options of models trained here (vd_jax.diffusion.schedule); VD's values
                beta_schedule='scaled_linear', rescale_zero_terminal_snr=False,
                prediction_type='epsilon')


# Default sizes of each model family's config section (family names: `vd_jax.models`).
SECTIONS = {'autokl': autokl, 'optimus': optimus, 'clip_vision': clip_vision,
            'clip_text': clip_text}


def model_config(streams, global_layer_ptr='image', name='vd', tiny=False, image_size=None,
                 sections=None):
    """The `model` section: diffuser streams plus, for every modality a stream uses, its VAE
    (data layers: to encode and decode that modality) and its context encoder (context
    layers), as `vd_jax.modalities` assigns them (vd.yaml `vae_cfg_list`, `ctx_cfg_list`).

    image_size: default generation side in pixels (512 for the released models, whose
    demo generates at 512; the tiny model 32).
    sections: {family: section} overriding the default sizes (`SECTIONS`)."""
    from vd_jax import modalities
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.image_size = int(image_size or (32 if tiny else 512))
    cfg.diffuser = dict(global_layer_ptr=global_layer_ptr, streams=streams)
    cfg.vae, cfg.ctx = {}, {}
    for m, s in streams.items():
        mod = modalities.get(m)
        for part, fam, sec in (('data', mod.vae_family, cfg.vae), ('context', mod.ctx_family,
                                                                      cfg.ctx)):
            if part in s['parts']:
                sec[m] = dict((sections or {}).get(fam) or SECTIONS[fam](tiny))
    cfg.schedule = schedule()
    # vd.yaml latent_scale_factor: each modality's default (image 0.18215, text 1)
    cfg.latent_scale_factor = {n: m.latent_scale for n, m in modalities.MODALITIES.items()
                               if m.latent_scale is not None}
    return cfg


def wrap(model, arg):
    """The top-level ConfigDict every run config returns."""
    cfg = ml_collections.ConfigDict()
    cfg.model = model
    cfg.variant = arg or 'full'
    return cfg
