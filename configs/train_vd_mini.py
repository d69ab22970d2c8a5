"""VD-mini from nothing, one stage per arg (`python train.py --config configs/train_vd_mini.py:STAGE`).

  autokl     stage 0: the image VAE on the shapes world's images
  clip       stage 0: both CLIP towers, contrastively on (image, caption) pairs
  optimus    stage 0: the text VAE on the captions
  basic      VD-basic (image variation), the frozen stage-0 encoders
  dc         VD-DC (+ text -> image), initialised from VD-basic's export
  four_flow  VD four-flow (+ image -> text, text variation), initialised from VD-DC's export

Set the previous stages' exports on the command line (docs/vd-mini.md has every command):
  encoders.ckpt=<autokl export>,<clip export>,<optimus export>
  init.sources.previous.path=<previous setting's export>

Data: the shapes world (`vd_jax.data.shapes`), built into `data.path` on first use
(default <workdir>/data; give one shared folder to build it once). `python -m
vd_jax.train.stages` runs the VD settings on the world pre-encoded once by the stage-0 exports
(`data.kind=encoded`: the same batches, a fifth less time per step); the commands above run
the frozen encoders in every step. Every number here is a
choice made for this world on a 2-core CPU, not the paper's (which trained on LAION).
"""
from configs import train_common, vd_mini

STAGES = ('autokl', 'clip', 'optimus', 'basic', 'dc', 'four_flow')
FLOWS = {'basic': ['i2i'], 'dc': ['t2i', 'i2i'], 'four_flow': ['t2i', 'i2i', 'i2t', 't2t']}
# Parts each stage-0 objective trains (and exports)
STAGE0 = {'autokl': 'vae_image', 'clip': 'ctx_text,ctx_image', 'optimus': 'vae_text'}


def get_config(arg=None):
    stage = arg or 'four_flow'
    if stage not in STAGES:
        raise ValueError(f'train_vd_mini: unknown stage {arg!r}; stages: {STAGES}')
    model_arg = stage if stage in ('basic', 'dc') else None
    root = vd_mini.get_config(model_arg)
    cfg = train_common.train_config(root, FLOWS.get(stage, []), stage,
                                    {'previous': train_common.source('', '*')})
    cfg.seed = 0
    cfg.dtype = 'float32'
    cfg.data.kind = 'shapes'
    cfg.data.num_records = 20_000          # training records of the world (held-out apart)
    cfg.data.image_size = vd_mini.IMAGE_SIZE
    cfg.data.random_crop = False           # positions are attributes: never crop
    cfg.data.worker_count = 0
    cfg.optimizer.warmup_steps = 200
    cfg.optimizer.schedule = 'cosine'
    cfg.optimizer.end_lr_factor = 0.1
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.grad_clip_norm = 1.0
    cfg.ema.decay = 0.999
    cfg.log_every = 50
    cfg.checkpoint.every = 500
    cfg.checkpoint.keep = 2
    cfg.init.method = 'exact'
    if stage in STAGE0:
        cfg.objective = stage
        cfg.grad_multipliers = {}
        cfg.ema.decay = 0.99
        if stage == 'autokl':
            # whole images: GroupNorm's statistics over a crop differ from the whole image's,
            # so a VAE trained on crops reconstructs whole images badly (measured: L1 0.15 vs
            # 0.037 on crops)
            # squared error, not L1 (L1's gradient is as large on the already-right background
            # as on the small shape), and 8 GroupNorm groups (configs/vd_mini.py): v1 (L1, 32
            # groups) never learned colour; its reconstructions kept shape and size but turned
            # every colour grey. Held-out colour read back from reconstructions after 300
            # steps: L1 + 8 groups 0.13, squared + 32 groups 0.14, squared + 8 groups 0.90.
            # 1000 steps, not 1500: the gate passes at 1000 with every attribute 1.0 (mean abs
            # error 0.0085 against 0.0062), and the whole rebuild with it took 1 h 58 min on a
            # 2-core Zen 4 host against 2 h 4.7 min with 1500, its model meeting every held-out
            # target (docs/vd-mini.md, Wall times)
            cfg.total_steps, cfg.batch_size, cfg.optimizer.lr = 1000, 16, 1e-3
            cfg.autokl.update(kl_weight=1e-5, crop=0, recon='l2')
        elif stage == 'clip':
            cfg.total_steps, cfg.batch_size, cfg.optimizer.lr = 2500, 64, 1e-3
            # v3: hard negatives. Every batch is 16 groups of 4: a record and three that each
            # differ from it in one attribute (vd_jax.data.hard_negatives). With random batches
            # the one-step position neighbours were rarely in a batch and the towers nearly
            # merged them: gate position 0.83 / 0.82 (v2); with groups of 4, the same steps and
            # seed: every attribute >= 0.999 (docs/vd-mini.md, Stage-0 gates)
            cfg.data.hard_negatives = 4
        else:
            cfg.total_steps, cfg.batch_size, cfg.optimizer.lr = 2000, 64, 1e-3
            # A nearly deterministic autoencoder: VD encodes captions to the posterior mean and
            # the diffuser generates latents that must decode exactly. With beta 0.2-0.5 the
            # posterior noise kept token accuracy at 72% (a deterministic one reaches 90% in
            # 400 steps); a small beta with 1 free nat per dimension and a KL warm-up over half
            # the run lets the autoencoder form first and still bounds the latents' scale.
            # v3: 500 steps of a plain autoencoder first; with posterior noise from step 0 the
            # encoder never wrote shape/background/size into z (docs/vd-mini.md, Diagnosis).
            # 1000, not 500: over the full GPT-2 vocabulary (the diagnosis ablated over the
            # world's 40 tokens) step 500 is too early (token accuracy 0.92, shape not yet in
            # z); the noise that starts there froze it out: gate shape 0.25, all else 1.0
            cfg.optimus.update(beta=0.05, free_bits=1.0, warmup_steps=1000,
                               deterministic_steps=1000)
            # a sampled softmax over the batch's targets + 1024 uniform tokens (decoding keeps
            # the full vocabulary): the stage took 53 min with the softmax over GPT-2's 50,260
            # tokens, 5 min 16 s with it, the same gate (1.0 every attribute), and a whole
            # rebuild with it met every held-out target (docs/vd-mini.md, Wall times). v3's
            # release was trained with the exact softmax (sampled_softmax=0)
            cfg.optimus.sampled_softmax = 1024
            # the loss sums over a sentence's tokens: gradient norms of 5-15, which a clip at
            # 1 turned into a 10x smaller learning rate (token accuracy stalled at 72%)
            cfg.optimizer.grad_clip_norm = 50.0
        return cfg
    cfg.objective = 'diffusion'
    # v3: v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023). With v2's eps
    # objective on VD's schedule the background and layout come from the initial noise:
    # trained from scratch for 1000 text->image steps, the background word decided the drawn
    # background 35% of the time at a fixed seed (chance 33%); with this objective 100%
    # (docs/vd-mini.md, the ablation from scratch; offset noise: 35%, + min-SNR-5: 92% and
    # worse shapes). Sampling resolves `--spacing auto` to 'trailing' for such a model.
    cfg.model.schedule.prediction_type = 'v_prediction'
    cfg.model.schedule.rescale_zero_terminal_snr = True
    cfg.batch_size = 32
    # VD-basic at 5e-4; the later settings at 1e-3: after basic's 3000 steps the samples were
    # still blurred averages (the eps loss carries little signal about a small shape on a
    # plain background), and the compute budget is a few thousand steps per setting
    cfg.optimizer.lr = {'basic': 5e-4, 'dc': 1e-3, 'four_flow': 1e-3}[stage]
    cfg.total_steps = {'basic': 3000, 'dc': 2000, 'four_flow': 3500}[stage]
    # The guidance scale the exported model recommends (`SamplingOptions.model_defaults`: what
    # a call or command line that gives no scale uses). Measured on v3's release (held out,
    # n=200, 50 steps): all five attributes at scale 3 / 7.5: text->image 0.96 / 0.91,
    # image->text 0.97 / 0.61, text variation 0.975 / 0.575 (docs/vd-mini.md, Guidance)
    cfg.model.sampling = dict(scale=3.0)
    cfg.encoders.vae_sample = False        # the posterior means: the VAE is nearly deterministic
    cfg.validation.update(every=1000, n=16, steps=25, metrics=['shapes'])
    return cfg
