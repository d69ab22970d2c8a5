"""LoRA adapters on the shipped VD-mini (`vd_jax/weights/vd_mini`): teach it something new.

  python train.py --config configs/train_lora_vd_mini.py --workdir runs/star \
      data.path=runs/star_renders lora.name=star

trains only the adapters (`vd_jax.lora.training`) for text -> image on a folder of images with
.txt captions (`python -m vd_jax.lora.teach_shape render` writes one; docs/lora.md is the
worked example), the frozen CLIP / AutoKL of VD-mini encoding them on the fly, and exports
`runs/star/export/step_<N>/star.safetensors`.

Adapters: q/k/v/out of the self- and cross-attention of the *text* stream's context layers
(text -> image runs the image data layers with the text context layers), their transformers'
feed-forward and proj_in/out, and the 3x3 convs of the image stream's ResBlocks (new geometry
is drawn there); rank 8, alpha 8 (0.99 MB). Settings chosen for the shapes world on this
2-core CPU, see docs/lora.md.
"""
import os

import vd_jax
from configs import train_common, vd_mini

VD_MINI = os.path.join(os.path.dirname(os.path.abspath(vd_jax.__file__)), 'weights', 'vd_mini')


def get_config(arg=None):
    del arg
    cfg = train_common.train_config(vd_mini.get_config(None), ['t2i'], None)
    cfg.seed = 0
    cfg.dtype = 'float32'
    cfg.data.kind = 'images'
    cfg.data.path = ''                     # a folder of images + .txt captions (required)
    cfg.data.filters = 'none'
    cfg.data.dataset_name = 'lora'
    cfg.data.image_size = vd_mini.IMAGE_SIZE
    cfg.data.random_crop = False           # positions are attributes: never crop
    cfg.encoders.ckpt = VD_MINI
    cfg.encoders.vae_sample = False        # as VD-mini was trained
    # Attention alone (q/k/v/out of the text context layers, 600 steps) drew a star for 16% of
    # held-out star prompts; the ResBlock convs of the image data layers too: 31% (docs/lora.md)
    cfg.lora.update(enabled=True, base=VD_MINI, name='lora', rank={'image': 8, 'text': 8},
                    alpha={'image': 8.0, 'text': 8.0},
                    targets=['text/context_blocks_*/*/attn[12]/to_[qkv]/kernel',
                             'text/context_blocks_*/*/attn[12]/to_out_0/kernel',
                             'text/context_blocks_*/*/ff/*/kernel',
                             'text/context_blocks_*/proj_*/kernel',
                             'image/data_blocks_*/in_layers_2/kernel',
                             'image/data_blocks_*/out_layers_3/kernel'])
    cfg.batch_size = 32
    cfg.total_steps = 800
    cfg.optimizer.lr = 2e-3
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.schedule = 'cosine'
    cfg.optimizer.end_lr_factor = 0.1
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.grad_clip_norm = 1.0
    cfg.ema.decay = 0.0                    # export the adapters as trained
    cfg.log_every = 50
    cfg.checkpoint.every = 200
    cfg.checkpoint.keep = 1
    cfg.init.method = 'exact'
    return cfg
