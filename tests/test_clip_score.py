"""CLIP score and CLIP image similarity against transformers' CLIPModel, through the converter.

Reference: a tiny random HF `CLIPModel` (the `tiny` config's towers: width 32, 2 layers,
projection 32, 32-pixel images), every 1-D parameter moved off its init; its state dict is
converted by `convert_checkpoint` into a checkpoint folder, which `CLIPScorer.from_checkpoint`
loads. The reference pipeline is all transformers: `CLIPProcessor` (`CLIPTokenizer` with the
bundled vocabulary, `CLIPImageProcessor` at 32 pixels), `get_text_features` /
`get_image_features`, and the definition 100 * max(cos, 0) per pair computed in torch
(`F.cosine_similarity`). Tolerance 1e-4 on embeddings and on scores in [0, 100] (both fp32;
measured ~1e-6).

torchmetrics' `CLIPScore` is not used as a reference: its 1.9.0 release expects
`get_text_features` to return a tensor (transformers 5 returns a `BaseModelOutputWithPooling`),
and `import torchmetrics` imports torch-fidelity's package when it is installed (the FID tests
need it), which imports torchvision.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint
from vd_jax.errors import InputError
from vd_jax.eval.clip_score import CLIPScorer, cosine_score
from vd_jax.tokenizers import clip_tokenizer

TOL = 1e-4
PROMPTS = ['a photo of a cat', 'an astronaut riding a horse on the moon, 4k photo', '']


@pytest.fixture(scope='module')
def cfg():
    return load_config('tiny').model


@pytest.fixture(scope='module')
def hf(cfg):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(cfg.ctx.text), vision_config=dict(cfg.ctx.image),
                                 projection_dim=cfg.ctx.text.projection_dim))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms, biases, class embedding: a swapped one cannot hide
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def scorer(cfg, hf, tmp_path_factory):
    """The HF towers as a diffusers-layout state dict (`text_encoder.` = text_model +
    text_projection, `image_encoder.` = vision_model + visual_projection), converted into a
    checkpoint folder."""
    sd = {}
    for k, v in hf.state_dict().items():
        if k.startswith(('text_model.', 'text_projection.')):
            sd['text_encoder.' + k] = v
        elif k.startswith(('vision_model.', 'visual_projection.')):
            sd['image_encoder.' + k] = v
        else:
            assert k == 'logit_scale', k  # the contrastive temperature: not part of a score
    out = convert_checkpoint(sd, cfg, str(tmp_path_factory.mktemp('clip') / 'ckpt'))
    return CLIPScorer.from_checkpoint(out, batch_size=2)


@pytest.fixture(scope='module')
def processor(cfg):
    from transformers import CLIPImageProcessor, CLIPProcessor
    s = cfg.ctx.image.image_size
    image_processor = CLIPImageProcessor(size={'shortest_edge': s},
                                         crop_size={'height': s, 'width': s})
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer().tokenizer)


def _images(seed, sizes):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        f = rng.uniform(1, 8, 3)
        img = 0.5 + 0.45 * np.stack([np.sin(f[0] * x), np.cos(f[1] * y), np.sin(f[2] * (x + y))], -1)
        img += rng.normal(0, 0.05, img.shape)
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return out


def _hf_text(hf, processor, prompts):
    ids = processor(text=prompts, padding='max_length', max_length=77, truncation=True,
                    return_tensors='pt')['input_ids']
    with torch.no_grad():
        return hf.get_text_features(input_ids=ids).pooler_output


def _hf_image(hf, processor, images):
    px = processor(images=[Image.fromarray(a) for a in images], return_tensors='pt')['pixel_values']
    with torch.no_grad():
        return hf.get_image_features(pixel_values=px).pooler_output


def _max(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_clip_score_matches_transformers(scorer, hf, processor):
    images = _images(0, [(48, 64), (100, 40), (32, 32)])
    # our side takes the last image as float in [0, 1]; clip_preprocess quantises it back to
    # these uint8 values (truncating x * 255, as VD and transformers' to_pil_image do)
    floats = [images[0], images[1], np.minimum((images[2].astype(np.float32) + 0.5) / 255, 1)]
    t_ref, i_ref = _hf_text(hf, processor, PROMPTS), _hf_image(hf, processor, images)
    t, i = scorer.text_embeds(PROMPTS), scorer.image_embeds(floats)
    # every (prompt, image) pair: 9 pairs, batches of 2
    pairs_p = [p for p in PROMPTS for _ in floats]
    pairs_i = [im for _ in PROMPTS for im in floats]
    raw_ref = 100 * F.cosine_similarity(t_ref[:, None], i_ref[None], dim=-1).numpy().reshape(-1)
    want = np.maximum(raw_ref, 0)
    got = scorer.clip_score(pairs_p, pairs_i)
    raw = scorer.clip_score(pairs_p, pairs_i, clamp=False)
    errs = dict(text_embeds=_max(t, t_ref), image_embeds=_max(i, i_ref), score=_max(got, want),
                raw=_max(raw, raw_ref))
    print('CLIP score', np.round(got, 3), 'raw', np.round(raw, 3), 'max abs errors', errs)
    assert t.shape == (3, 32) and i.shape == (3, 32) and got.shape == (9,)
    assert max(errs.values()) < TOL, errs
    assert np.all(got >= 0) and np.all(got <= 100)
    # the random tiny model gives negative cosines for some pairs: the clamp is exercised
    assert np.any(raw < -1) and np.all(got[raw < 0] == 0), raw
    assert np.all(got[raw > 0] == raw[raw > 0])


def test_image_similarity_matches_transformers(scorer, hf, processor):
    a = _images(1, [(64, 64), (30, 50), (33, 77)])
    b = _images(2, [(64, 64), (90, 90), (40, 40)])
    b[0] = a[0]  # an image with itself: exactly 100
    want = np.maximum(100 * F.cosine_similarity(_hf_image(hf, processor, a),
                                                _hf_image(hf, processor, b), dim=-1).numpy(), 0)
    got = scorer.image_similarity(a, b)
    err = _max(got, want)
    print('image similarity', np.round(got, 3), 'max abs error', err)
    assert err < TOL, err
    assert got[0] == pytest.approx(100, abs=1e-4)


def test_cosine_score_and_errors(cfg, scorer):
    np.testing.assert_allclose(cosine_score([[1, 0], [1, 1], [0, 1]], [[2, 0], [1, 0], [0, -3]]),
                               [100, 100 / np.sqrt(2), 0])
    np.testing.assert_allclose(cosine_score([[0, 1]], [[0, -3]], clamp=False), [-100])
    with pytest.raises(InputError, match='2 prompts but 3 images'):
        scorer.clip_score(PROMPTS[:2], _images(3, [(32, 32)] * 3))
    with pytest.raises(InputError, match='one shape'):
        cosine_score(np.ones((2, 3)), np.ones((3, 3)))
    text_only = CLIPScorer(scorer.text_params, None, cfg.ctx.text)
    assert text_only.text_embeds('a cat').shape == (1, 32)
    with pytest.raises(InputError, match='no image tower'):
        text_only.image_embeds(_images(4, [(32, 32)]))
    with pytest.raises(InputError, match='at least one'):
        CLIPScorer()
