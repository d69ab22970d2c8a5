"""The non-weight files of a diffusers Versatile Diffusion folder, from a vd_jax model config.

Each model sub-folder gets the config.json its diffusers/transformers class reads:
  image_unet/     `UNet2DConditionModel` (the image stream: time MLP, image data layers,
                  image-context layers)
  text_unet/      `UNetFlatConditionModel` (diffusers' deprecated versatile_diffusion module;
                  the text stream: text data layers, text-context layers, a copy of the time MLP)
  vae/            `AutoencoderKL`
  text_encoder/   `CLIPTextModelWithProjection`
  image_encoder/  `CLIPVisionModelWithProjection`
and, as diffusers' VersatileDiffusion folder has them, `model_index.json`, `scheduler/`
(DDIM on the model's schedule and prediction type), `tokenizer/` (the CLIP BPE files bundled
in `vd_jax/vocab`) and `image_feature_extractor/` (CLIPImageProcessor at the vision tower's
resolution).

diffusers' attention-block naming quirk: its UNets' `attention_head_dim` is the number of
heads (diffusers issue #2011), which is what VD's `num_heads` is.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
from typing import Any, Dict, List, Mapping

from vd_jax.tokenizers import VOCAB_DIR

from vd_jax.image_io import CLIP_MEAN, CLIP_STD

# The diffusers release these folders were verified with (setup.cfg `test` extra).
DIFFUSERS_VERSION = '0.42.1'
# One folder per key prefix of the 'diffusers' layout: (folder, library, class, weights file)
MODEL_FOLDERS = {
    'image_unet': ('diffusers', 'UNet2DConditionModel', 'diffusion_pytorch_model.safetensors'),
    # diffusers resolves this module path from sys.modules (the VersatileDiffusion pipelines
    # import it); its own save_pretrained writes ['diffusers', ...], which it cannot load back
    'text_unet': ('diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet',
                  'UNetFlatConditionModel', 'diffusion_pytorch_model.safetensors'),
    'vae': ('diffusers', 'AutoencoderKL', 'diffusion_pytorch_model.safetensors'),
    'text_encoder': ('transformers', 'CLIPTextModelWithProjection', 'model.safetensors'),
    'image_encoder': ('transformers', 'CLIPVisionModelWithProjection', 'model.safetensors'),
}
# UNetFlatConditionModel's flat blocks (LinearMultiDim, ResnetBlockFlat) hard-code 4 positions
FLAT_SECOND_DIM = 4
# diffusers' default latent size of the image UNet (VD samples 512 px = 64 latents); it only
# sets the pipelines' default output size
SAMPLE_SIZE = 64


def _per_level(values):
    values = [int(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def _unet_common(s) -> Dict[str, Any]:
    """The arguments UNet2DConditionModel and UNetFlatConditionModel share, from a stream."""
    widths = [s.model_channels * m for m in s.channel_mult]
    return dict(
        flip_sin_to_cos=True, freq_shift=0,  # VD's sinusoidal embedding puts cos first
        block_out_channels=widths, layers_per_block=_per_level(s.num_res_blocks),
        downsample_padding=1, mid_block_scale_factor=1, act_fn='silu', norm_num_groups=32,
        norm_eps=1e-5, cross_attention_dim=s.context_dim,
        attention_head_dim=_per_level([s.heads(w)[0] for w in widths]),
        dual_cross_attention=False, use_linear_projection=False, upcast_attention=False,
        only_cross_attention=False, center_input_sample=False)


def _check_stream(s, need=('data', 'context')) -> None:
    missing = [p for p in need if p not in s.parts]
    if missing:
        raise ValueError(f"diffuser stream '{s.name}' has parts {list(s.parts)}; a diffusers "
                          f'{s.name}_unet needs its {missing} layers too (export the v1.0 '
                          'or legacy layout instead)')


def unet_config(stream, global_stream) -> Dict[str, Any]:
    """config.json of `<stream.name>_unet` (image: UNet2DConditionModel, text: UNetFlat...).

    `global_stream` owns the time MLP; it must have the same width (every diffusers UNet
    carries a copy of it)."""
    s = stream
    want = {'image': '2d', 'text': '0d'}
    if want.get(s.name) != s.kind:
        raise ValueError(f"diffuser stream '{s.name}' ({s.kind}): diffusers' VersatileDiffusion "
                          "folder has an 'image' stream of kind 2d and a 'text' stream of kind 0d")
    _check_stream(s)
    if s.time_embed_dim != global_stream.time_embed_dim:
        raise ValueError(f"diffuser stream '{s.name}' has model_channels {s.model_channels} but "
                          f"the time MLP (stream '{global_stream.name}') is built for "
                          f'{global_stream.model_channels}; diffusers UNets own their time MLP')
    attn = [bool(a) for a in s.attn_levels]
    if s.kind == '2d':
        cls, down, up, mid = ('UNet2DConditionModel', ('CrossAttnDownBlock2D', 'DownBlock2D'),
                              ('CrossAttnUpBlock2D', 'UpBlock2D'), 'UNetMidBlock2DCrossAttn')
        io = dict(sample_size=SAMPLE_SIZE, in_channels=s.in_channels, out_channels=s.out_channels)
    else:
        if s.second_dim != FLAT_SECOND_DIM:
            raise ValueError(f"diffuser stream '{s.name}' has second_dim {s.second_dim}; "
                              f"diffusers' UNetFlatConditionModel only has {FLAT_SECOND_DIM}")
        cls, down, up, mid = ('UNetFlatConditionModel', ('CrossAttnDownBlockFlat', 'DownBlockFlat'),
                              ('CrossAttnUpBlockFlat', 'UpBlockFlat'), 'UNetMidBlockFlatCrossAttn')
        io = dict(sample_size=None, in_channels=[s.in_channels, 1, 1],
                  out_channels=[s.out_channels, 1, 1])
    return dict(_class_name=cls, _diffusers_version=DIFFUSERS_VERSION, **io,
                down_block_types=[down[0] if a else down[1] for a in attn],
                up_block_types=[up[0] if a else up[1] for a in reversed(attn)],
                mid_block_type=mid, **_unet_common(s))


def vae_config(autokl, scaling_factor: float) -> Dict[str, Any]:
    """config.json of `vae/` (diffusers AutoencoderKL) from the AutoKL config."""
    # lazy: vd_jax.models.vae pulls in jax, flax (+0.7 s)
    from vd_jax.models.vae import as_autokl_config  # noqa: PLC0415
    a = as_autokl_config(autokl)
    if a.z_channels != a.embed_dim:
        raise ValueError(f'AutoKL z_channels={a.z_channels} != embed_dim={a.embed_dim}: '
                          "diffusers' AutoencoderKL has one latent_channels for both")
    if a.ch_mult[0] != 1:
        raise ValueError(f"AutoKL ch_mult[0]={a.ch_mult[0]}: diffusers' AutoencoderKL widens "
                          'only between levels (needs ch_mult[0] == 1)')
    attn = [a.level_has_attn(i) for i in range(a.num_levels)]
    return dict(
        _class_name='AutoencoderKL', _diffusers_version=DIFFUSERS_VERSION,
        in_channels=a.in_channels, out_channels=a.out_ch,
        down_block_types=['AttnDownEncoderBlock2D' if x else 'DownEncoderBlock2D' for x in attn],
        up_block_types=['AttnUpDecoderBlock2D' if x else 'UpDecoderBlock2D'
                        for x in reversed(attn)],
        block_out_channels=[a.ch * m for m in a.ch_mult], layers_per_block=a.num_res_blocks,
        act_fn='silu', latent_channels=a.z_channels, norm_num_groups=a.norm_groups,
        sample_size=a.resolution, scaling_factor=float(scaling_factor),
        force_upcast=True, mid_block_add_attention=True, use_quant_conv=True,
        use_post_quant_conv=True)


def clip_text_config(ctx_text) -> Dict[str, Any]:
    """config.json of `text_encoder/` (transformers CLIPTextModelWithProjection)."""
    # lazy: vd_jax.models.clip pulls in jax, flax (+0.7 s)
    from vd_jax.models.clip import CLIPTextConfig  # noqa: PLC0415
    c = dataclasses.asdict(CLIPTextConfig.from_dict(ctx_text))
    # openai/clip-vit-large-patch14's special ids: <|startoftext|>, and <|endoftext|> pads
    return dict(architectures=['CLIPTextModelWithProjection'], model_type='clip_text_model',
                bos_token_id=49406, pad_token_id=c['eos_token_id'], **c)


def clip_vision_config(ctx_image) -> Dict[str, Any]:
    """config.json of `image_encoder/` (transformers CLIPVisionModelWithProjection)."""
    from vd_jax.models.clip import CLIPVisionConfig  # noqa: PLC0415
    c = dataclasses.asdict(CLIPVisionConfig.from_dict(ctx_image))
    return dict(architectures=['CLIPVisionModelWithProjection'], model_type='clip_vision_model',
                **c)


def scheduler_config(schedule: Mapping) -> Dict[str, Any]:
    """`scheduler/scheduler_config.json`: DDIM on the model's schedule (`model.schedule`; VD's
    betas = linspace(sqrt(start), sqrt(end), T)^2 are diffusers' 'scaled_linear'), with what
    the model predicts. With zero terminal SNR the grid is 'trailing' (its first step is the
    pure-noise t = T - 1, Lin et al. 2023), else diffusers' 'leading' with steps_offset 1 (VD's
    original grid). `vd_jax.convert.diffusers_scheduler` reads it back."""
    # lazy: vd_jax.diffusion.schedule pulls in jax, flax (+0.7 s)
    from vd_jax.diffusion.schedule import ScheduleConfig  # noqa: PLC0415
    sc = ScheduleConfig.coerce(schedule)
    return dict(_class_name='DDIMScheduler', _diffusers_version=DIFFUSERS_VERSION,
                num_train_timesteps=int(sc.timesteps), beta_start=float(sc.beta_linear_start),
                beta_end=float(sc.beta_linear_end), beta_schedule=sc.beta_schedule,
                trained_betas=None, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                prediction_type=sc.prediction_type,
                rescale_betas_zero_snr=bool(sc.rescale_zero_terminal_snr),
                timestep_spacing='trailing' if sc.rescale_zero_terminal_snr else 'leading')


def model_index(folders: List[str], extras: List[str]) -> Dict[str, Any]:
    out = dict(_class_name='VersatileDiffusionPipeline', _diffusers_version=DIFFUSERS_VERSION)
    for f in folders:
        out[f] = list(MODEL_FOLDERS[f][:2])
    if 'scheduler' in extras:
        out['scheduler'] = ['diffusers', 'DDIMScheduler']
    if 'tokenizer' in extras:
        out['tokenizer'] = ['transformers', 'CLIPTokenizer']
    if 'image_feature_extractor' in extras:
        out['image_feature_extractor'] = ['transformers', 'CLIPImageProcessor']
    return dict(sorted(out.items()))


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')


def write_tokenizer(folder: str, max_length: int) -> None:
    """`tokenizer/` for transformers' CLIPTokenizer from the bundled vocabulary."""
    os.makedirs(folder, exist_ok=True)
    for src, dst in (('clip_vocab.json.gz', 'vocab.json'), ('clip_merges.txt.gz', 'merges.txt')):
        with gzip.open(os.path.join(VOCAB_DIR, src), 'rb') as fi, \
                open(os.path.join(folder, dst), 'wb') as fo:
            shutil.copyfileobj(fi, fo)
    eot = '<|endoftext|>'
    write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
        tokenizer_class='CLIPTokenizer', model_max_length=int(max_length), errors='replace',
        bos_token='<|startoftext|>', eos_token=eot, unk_token=eot, pad_token=eot,
        do_lower_case=True, add_prefix_space=False))
    write_json(os.path.join(folder, 'special_tokens_map.json'), dict(
        bos_token='<|startoftext|>', eos_token=eot, unk_token=eot, pad_token=eot))


def write_image_processor(folder: str, image_size: int) -> None:
    """`image_feature_extractor/` for transformers' CLIPImageProcessor (bicubic resize of the
    short side, centre crop, CLIP mean/std), as `vd_jax.image_io.clip_preprocess`."""
    write_json(os.path.join(folder, 'preprocessor_config.json'), dict(
        image_processor_type='CLIPImageProcessor', feature_extractor_type='CLIPFeatureExtractor',
        do_resize=True, size=dict(shortest_edge=int(image_size)), resample=3,
        do_center_crop=True, crop_size=dict(height=int(image_size), width=int(image_size)),
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True))
