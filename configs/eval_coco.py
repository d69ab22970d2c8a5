"""The paper's text->image evaluation on COCO captions, for `python -m vd_jax.eval fid|clip`.

Point it at your local COCO 2014 validation set (not downloaded by vd_jax):

  python -m vd_jax.eval fid-stats /data/coco/val2014 coco_val2014_512.npz --size 512 \
      --inception pt_inception-2015-12-05-6726825d.pth          # once: reference statistics
  python -m vd_jax.eval fid --config configs/eval_coco.py --ckpt converted/vd4 \
      --prompts /data/coco/annotations/captions_val2014.json \
      --ref-stats coco_val2014_512.npz --inception pt_inception-2015-12-05-6726825d.pth
  python -m vd_jax.eval clip --config configs/eval_coco.py --ckpt converted/vd4 \
      --prompts /data/coco/annotations/captions_val2014.json

(or `--ref-images /data/coco/val2014 --stats-out coco_val2014_512.npz` in the first fid run).
An interrupted run continues with `--resume evals/fid-NNN`.

Protocol: 30,000 samples at 512 x 512, one per COCO val2014 image: the caption with the
lowest annotation id of each of the first 30,000 images in image-id order (`vd_jax.eval.
generate.coco_captions`); sample i uses seed i. Reference: every val2014 image, centre-cropped
to a square and resized (bicubic) to 512 x 512, through the standard FID Inception
(pytorch-fid's weights). CLIP score: 100 * max(cos, 0) with the model's own CLIP ViT-L/14
towers (those torchmetrics' CLIPScore uses by default), mean over the samples.
Sampler: DDIM, 50 steps, eta 0, classifier-free guidance 7.5: the released model's sampling
defaults. The paper's exact FID settings (guidance scale(s), caption subset) could not be
verified here (UNVERIFIED vs paper); sweep `--scale` for a FID-vs-guidance curve.
Every key below is a flag of `python -m vd_jax.eval fid|clip` ('_' for '-'); flags given on the
command line override them.
"""
import ml_collections


def get_config(arg=None):
    del arg
    cfg = ml_collections.ConfigDict()
    cfg.task = 't2i'
    cfg.n = 30_000
    cfg.height = 512
    cfg.width = 512
    cfg.sampler = 'ddim'
    cfg.steps = 50             # UNVERIFIED vs paper (the release's sampling default)
    cfg.scale = 7.5            # UNVERIFIED vs paper (the release's sampling default)
    cfg.eta = 0.0
    cfg.seed = 0
    cfg.batch_size = 16        # samples per compiled call; any value gives the same samples
    cfg.inception_batch_size = 50
    cfg.out = 'evals'
    return cfg
