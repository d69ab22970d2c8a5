"""Shared training settings: every key `vd_jax.train` reads, with labelled defaults.

The VD paper's training hyper-parameters (learning rates, batch sizes, iterations, gradient
multipliers of SD-initialised layers, the progressive schedule) are NOT in the released code
and could not be verified here (VD's training code was never released). None of the numbers
below claims to be the paper's: they are generic latent-diffusion defaults, marked
`# default (UNVERIFIED vs paper)`.
Override any key on the command line: `python train.py --config ... optimizer.lr=5e-5`.
"""
import ml_collections

from vd_jax.sharding import DEFAULT_RULES


# Where an SD-style UNet's layers go (source stream 'image' after conversion -> target).
SD_MAP = 'image/time_embed->image/time_embed, image/data_blocks->image/data_blocks'
SD_TEXT_CONTEXT_MAP = 'image/context_blocks->text/context_blocks'      # SD cross-attn = text ctx
SD_VARIATION_MAP = 'image/context_blocks->image/context_blocks'        # SD-variation = image ctx


def groups(model_cfg):
    """Parameter groups of a model config: 'global', '<stream>_data', '<stream>_context'."""
    out = ['global']
    for name, s in model_cfg.diffuser.streams.items():
        for part in ('data', 'context'):
            if part in s['parts']:
                out.append(f'{name}_{part}')
    return out


def train_config(model_root, flows, arg=None, init_sources=None):
    """A training ConfigDict around a model config (`configs/vd_*.get_config(...)`)."""
    cfg = ml_collections.ConfigDict()
    cfg.model = model_root.model
    cfg.variant = model_root.variant
    cfg.seed = 0
    cfg.flows = list(flows)
    # Loss weight per flow (flows not listed in `flows` are ignored).
    cfg.flow_weights = {'t2i': 1.0, 'i2i': 1.0, 'i2t': 1.0, 't2t': 1.0}
    # Update multiplier per parameter group (a per-group learning-rate scale; 0 freezes).
    cfg.grad_multipliers = {g: 1.0 for g in groups(cfg.model)}

    # What is optimised: 'diffusion' (the diffuser, the flows above) or a stage-0 network
    # trained from scratch: 'autokl' | 'optimus' | 'clip' (`vd_jax.train.objectives`).
    cfg.objective = 'diffusion'
    # Classifier-free guidance needs an unconditional model: per flow and record, the context
    # is replaced with probability p by the unconditional context the pipeline samples with
    # (convention `uncond`, see vd_jax.modalities). 0.1 is the usual choice (UNVERIFIED vs paper).
    cfg.cfg_dropout = dict(p=0.1, uncond='v1.0')
    cfg.autokl = dict(kl_weight=1e-6, recon='l1', crop=0)   # objective 'autokl' (crop: side)
    # objective 'optimus'; deterministic_steps > 0: a plain autoencoder first (z = mu, no KL);
    # sampled_softmax K > 0: the batch's tokens + K random ones instead of the whole vocabulary
    cfg.optimus = dict(beta=0.5, free_bits=0.1, warmup_steps=1000, deterministic_steps=0,
                       sampled_softmax=0)

    cfg.total_steps = 100_000            # default (UNVERIFIED vs paper)
    cfg.batch_size = 64                  # global batch; default (UNVERIFIED vs paper)
    cfg.microbatches = 1                 # gradient accumulation inside one step
    cfg.dtype = 'float32'                # compute dtype: 'float32' | 'bfloat16' (fp32 master weights)
    cfg.remat = False                    # rematerialise blocks in the backward pass

    cfg.optimizer = dict(
        name='adamw',
        lr=1e-4,                         # default (UNVERIFIED vs paper; LDM-style value)
        schedule='constant',             # after warm-up: 'constant' | 'linear' | 'cosine'
        warmup_steps=1000,               # default
        end_lr_factor=0.0,               # linear/cosine end: lr * end_lr_factor
        b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.01,               # torch AdamW's default; not the paper's (UNVERIFIED)
        momentum=0.0,                    # sgd only
        grad_clip_norm=1.0,              # global-norm clipping; 0 disables
    )
    cfg.ema = dict(decay=0.9999,         # LitEma's default in the original code
                   use_num_updates=True)  # decay = min(decay, (1+n)/(10+n)) as LitEma
    cfg.noise = dict(fixed=False,        # True: (t, eps) per batch position, not per step (tests)
                     offset=0.0)         # offset noise s: eps + s N(0, 1) per (sample, channel)
    # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off (VD). 5 is the paper's value.
    # What the model predicts (eps / v / x0) is the model's: model.schedule.prediction_type.
    cfg.loss = dict(snr_gamma=0.0)

    cfg.mesh = dict(data=-1, fsdp=1, model=1)  # -1: all remaining devices
    cfg.logical_axis_rules = list(DEFAULT_RULES)

    cfg.data = dict(
        kind='synthetic',                # 'synthetic' | 'encoded' (preencode output) | 'images'
        path='',                         # prepared dataset folder, or a raw image+caption folder
        prepared_dir='',                 # where a raw folder is built (default <workdir>/data)
        dataset_name='default',
        filters='laion',                 # raw folder build: 'laion' (paper filters) | 'none'
        image_size=256,                  # crop side for 'images'
        random_crop=True,
        shuffle=True,
        # 'shapes' only: batches of groups of k records, a base + k-1 records that each differ
        # from it in one attribute (vd_jax.data.hard_negatives); 0 = off, else k >= 2 dividing
        # the per-process batch. The attributes members may change, comma-separated:
        hard_negatives=0,
        hard_negative_attrs='shape,colour,background,size,position',
        seed=0,
        worker_count=0,
        num_records=256,                 # synthetic only
        latent_size=32,                  # synthetic only: latent side (image_size / 8)
        context_len={'text': 77, 'image': 257},  # synthetic only
    )
    # Frozen encoders for data.kind='images': a vd_jax checkpoint folder holding vae_image /
    # ctx_image / ctx_text (e.g. a converted release), or 'random' (smoke runs only).
    cfg.encoders = dict(ckpt='', vae_sample=True)

    cfg.init = dict(method='exact',      # 'exact' (modules' initialisers) | 'random' (numpy)
                    sources=init_sources or {})

    # LoRA (vd_jax.lora.training): enabled=True trains only adapters on the frozen diffuser of
    # the checkpoint folder `base` ('' = the shipped VD-mini) and exports one adapter file
    # `export/step_<N>/<name>.safetensors`. targets: glob patterns over kernel paths ([] = the
    # attention projections q/k/v/out of every context layer); rank / alpha per stream (rank 0:
    # none on that stream); save_dtype: the export's tensors, 'float32' or 'float16' (half the
    # file; sampling computes in float32 either way).
    cfg.lora = dict(enabled=False, base='', name='lora', description='', targets=[],
                    rank={'image': 4, 'text': 4}, alpha={'image': 4.0, 'text': 4.0},
                    save_dtype='float32')

    # Sampling with the EMA weights during training (vd_jax.train.validation): every N steps
    # (0: never), n samples per trained flow, metrics 'shapes' and/or 'clip_score' (on
    # `prompts`), grids into <workdir>/validation/ and TensorBoard.
    cfg.validation = dict(every=0, n=16, steps=25, scale=7.5, metrics=[], prompts=[])

    cfg.log_every = 50
    # perf.jsonl / TensorBoard: perf/tflops_per_device and perf/mfu against this per-device
    # peak (TFLOP/s); 0: vd_jax.train.observe.PEAKS by device kind, or measured on CPU
    cfg.perf = dict(peak_tflops=0.0)
    cfg.checkpoint = dict(every=1000, keep=3, async_save=True)
    cfg.export = dict(at_end=True)
    cfg.tensorboard = True               # if tensorboardX / tensorboard is installed
    cfg.jax_cache_dir = ''               # persistent XLA compilation cache
    return cfg


def source(path='', map_='*'):
    return dict(path=path, map=map_)
