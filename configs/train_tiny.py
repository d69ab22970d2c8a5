"""A CPU-sized four-flow training run on synthetic latents (smoke runs, tests, tutorials).

  python train.py --config configs/train_tiny.py --workdir /tmp/vd_tiny

trains the tiny four-flow diffuser (`configs/tiny.py`) for 200 steps on random latents and
contexts, checkpoints, and exports the EMA weights to /tmp/vd_tiny/export/step_200.
On a folder of images with .txt captions (all four flows; the frozen tiny AutoKL / CLIP /
Optimus get random weights unless you give a converted checkpoint of the same sizes):

  python train.py --config configs/train_tiny.py --workdir /tmp/vd_tiny_img \
      data.kind=images data.path=/my/photos data.filters=none encoders.ckpt=random

Args: None (tiny four-flow), 'test' (an even smaller diffuser, one level, used by the tests).
"""
from configs import common, train_common, vd_four_flow


def _test_model():
    image = common.tiny_image_stream()
    # One level, context layers only in the middle block: every parameter group of the
    # four-flow model is present, with 176 parameter tensors instead of the tiny model's 560
    # (XLA's CPU compile time grows with the number of tensors the optimizer touches).
    image.update(channel_mult=[1], num_res_blocks=[1], attention_resolutions=[])
    text = common.tiny_text_stream()
    text.update(channel_mult=[1], num_noattn_blocks=[1], second_dim=[4], with_attn=[False])
    model = common.model_config(dict(image=image, text=text), tiny=True, name='vd_train_test')
    return common.wrap(model, 'test')


def get_config(arg=None):
    if arg == 'test':
        root = _test_model()
    elif arg in (None, '', 'tiny'):
        root = vd_four_flow.get_config('tiny')
    else:
        raise ValueError(f"train_tiny: unknown arg {arg!r} (use nothing or 'test')")
    cfg = train_common.train_config(root, ['t2i', 'i2i', 'i2t', 't2t'], arg,
                                    {'smaller': train_common.source('', '*')})
    cfg.total_steps = 200
    cfg.batch_size = 8
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.weight_decay = 0.0
    cfg.ema.decay = 0.99
    cfg.init.method = 'random'           # numpy init: no 40 s init compile on CPU
    cfg.data.num_records = 64
    cfg.data.latent_size = 8
    cfg.data.image_size = 16             # 'images': 16 px crops -> 8x8 latents (tiny VAE is f=2)
    # as many tokens as the tiny CLIP towers give (77 text; (32/2)^2 + 1 image patches), so
    # synthetic and image-encoded batches have one shape and share one compiled step
    cfg.data.context_len = {'text': 77, 'image': 257}
    cfg.log_every = 10
    cfg.checkpoint.every = 50
    cfg.checkpoint.keep = 2
    return cfg
