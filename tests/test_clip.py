"""CLIP context encoders, their converter and the CLIP image preprocessing.

Parity references are transformers' own `CLIPTextModelWithProjection` and
`CLIPVisionModelWithProjection` at the tiny config (width 32, 2 layers, 2 heads, projection
32, 32-pixel images with 2-pixel patches -> 257 tokens like ViT-L/14), converted through
`convert_checkpoint`, with every 1-D parameter (norm scales/biases, class embedding, biases)
moved off its init so a swapped norm or bias cannot hide. VD's context normalisation is
recomputed here from the reference outputs (anchors §1.6).

Tolerance: 1e-4 max abs on outputs of magnitude <= ~10. Both sides are fp32; the only
differences are summation orders in matmuls and softmax through 2 layers, measured at
~1e-6. Any mis-mapped tensor (a missing transpose, a swapped q/k, the wrong norm) gives
errors of order 1e-1.

Preprocessing is compared with transformers' `CLIPImageProcessor` (its PIL backend, as no
torchvision is installed) on generated photo-like images saved as PNG and JPEG, landscape,
portrait, a non-square crop, an image more than twice as tall as wide and an upscaled small
one. Tolerance: exact (0): our resampler reproduces Pillow's integer arithmetic.
"""

import jax
import jax.numpy as jnp
import listing
import numpy as np
import pytest
import torch
from PIL import Image

from vd_jax.checkpoint import flatten
from vd_jax.config import load_config
from vd_jax.convert import convert_checkpoint, plan_conversion
from vd_jax.convert.sources import TensorSource
from vd_jax.errors import CheckpointError, InputError
from vd_jax.image_io import CLIP_MEAN, CLIP_STD, clip_preprocess, load_image, resize_bicubic
from vd_jax.models import family
from vd_jax.models.init import abstract_params


def text_context(section):
    return family('clip_text').build(section)


def image_context(section):
    return family('clip_vision').build(section)
from vd_jax.tokenizers import clip_tokenizer

TOL = 1e-4


# ----------------------------------------------------------------------------------------
# Tiny references and the converted model
# ----------------------------------------------------------------------------------------

def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope='module')
def cfg():
    return load_config('tiny').model


@pytest.fixture(scope='module')
def refs(cfg):
    from transformers import (CLIPTextConfig as HFText, CLIPTextModelWithProjection,
                              CLIPVisionConfig as HFVision, CLIPVisionModelWithProjection)
    torch.manual_seed(0)
    tm = _perturb(CLIPTextModelWithProjection(HFText(**dict(cfg.ctx.text))), 1)
    vm = _perturb(CLIPVisionModelWithProjection(HFVision(**dict(cfg.ctx.image))), 2)
    sd = {f'text_encoder.{k}': v for k, v in tm.state_dict().items()}
    sd.update({f'image_encoder.{k}': v for k, v in vm.state_dict().items()})
    params = convert_checkpoint(sd, cfg)
    return dict(tm=tm, vm=vm, sd=sd, params=params)


def _photo(h, w, seed=0):
    """A deterministic photo-like uint8 image: smooth gradients, shapes, texture, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([0.3 + 0.5 * x / w, 0.2 + 0.6 * y / h, 0.6 - 0.3 * (x + y) / (w + h)], -1)
    for _ in range(6):  # discs and rectangles of random colours
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        col = rng.uniform(0, 1, 3)
        if rng.uniform() < 0.5:
            img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = col
        else:
            img[(abs(y - cy) < r) & (abs(x - cx) < 0.6 * r)] = col
    img += 0.08 * np.sin(x / 3.0 + np.sin(y / 7.0))[..., None]  # texture with fine detail
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope='module')
def photo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('photos')
    big = _photo(480, 640)
    files = {}
    for name, arr, fmt in [('landscape.png', big, 'PNG'), ('landscape.jpg', big, 'JPEG'),
                           ('portrait.jpg', _photo(500, 333, 1), 'JPEG'),
                           ('crop.png', big[37:398, 101:590], 'PNG'),      # non-square crop
                           ('tall.png', _photo(700, 250, 2), 'PNG'),       # H - h > 2 (W - w)
                           ('small.png', _photo(100, 150, 3), 'PNG')]:     # upsampled
        p = str(d / name)
        Image.fromarray(arr).save(p, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
        files[name] = p
    return files


def _max(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------

def test_text_parity(cfg, refs):
    tok = clip_tokenizer()
    ids = tok(['a photo of a cat', '', 'an astronaut riding a horse on the moon, 4k photo'])
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 49406, (1, 77))  # random ids, EOT at 40, EOT padding after
    rand[0, 40:] = 49407
    ids = np.concatenate([ids, rand]).astype(np.int32)
    model = text_context(cfg.ctx.text)
    ctx, aux = jax.jit(model.apply)({'params': refs['params']['ctx_text']}, ids)
    tm = refs['tm']
    with torch.no_grad():
        t_ids = torch.from_numpy(ids).long()
        out = tm(t_ids)
        pooled = tm.text_model(t_ids).pooler_output
        # VD (SHI-Labs clip.py / diffusers _encode_prompt): all 77 tokens projected, divided
        # by the norm of the projected pooled (EOT) token, one scalar per sample
        ref_ctx = tm.text_projection(out.last_hidden_state) / \
            out.text_embeds.norm(dim=-1, keepdim=True)[:, None]
    assert ctx.shape == (4, 77, 32) and ctx.dtype == jnp.float32
    errs = dict(last_hidden=_max(aux['last_hidden_state'], out.last_hidden_state),
                pooled=_max(aux['pooled'], pooled), text_embeds=_max(aux['text_embeds'], out.text_embeds),
                context=_max(ctx, ref_ctx))
    print('text max abs errors', errs)
    assert max(errs.values()) < TOL, errs
    # the pooled token is the EOT one: |context at EOT| = 1
    eot = np.argmax(ids, -1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ctx)[np.arange(4), eot], axis=-1), 1, rtol=1e-5)


@pytest.mark.slow
def test_image_parity(cfg, refs, photo_files):
    pixels = clip_preprocess([photo_files['landscape.png'], photo_files['portrait.jpg'],
                              np.zeros((64, 64, 3), np.float32)], size=32)
    model = image_context(cfg.ctx.image)
    ctx, aux = jax.jit(model.apply)({'params': refs['params']['ctx_image']}, pixels)
    vm = refs['vm']
    with torch.no_grad():
        px = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        out = vm(px)
        pooled = vm.vision_model(px).pooler_output
        # VD: post_layernorm on ALL tokens -> visual_projection, / norm of the CLS token
        z = vm.visual_projection(vm.vision_model.post_layernorm(out.last_hidden_state))
        ref_ctx = z / z[:, :1].norm(dim=-1, keepdim=True)
    assert ctx.shape == (3, 257, 32)
    errs = dict(last_hidden=_max(aux['last_hidden_state'], out.last_hidden_state),
                pooled=_max(aux['pooled'], pooled), image_embeds=_max(aux['image_embeds'], out.image_embeds),
                context=_max(ctx, ref_ctx))
    print('image max abs errors', errs)
    assert max(errs.values()) < TOL, errs
    with pytest.raises(ValueError, match=r'pixel_values must be \(B, 32, 32, 3\)'):
        model.apply({'params': refs['params']['ctx_image']}, pixels[:, :16])


# ----------------------------------------------------------------------------------------
# Converter: layouts, flat keys, ignored towers, bad input
# ----------------------------------------------------------------------------------------

def _hf_clipmodel(cfg, seed):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    c = CLIPConfig(text_config=dict(cfg.ctx.text), vision_config=dict(cfg.ctx.image),
                   projection_dim=32)
    return _perturb(CLIPModel(c), seed)


def test_vd_v1_layout_full_clipmodels(cfg):
    """`ctx.{text,image}.model.*` = two full CLIPModels (+ 4.24's position_ids buffers):
    each part takes its own tower and ignores the other one by name."""
    a, b = _hf_clipmodel(cfg, 3), _hf_clipmodel(cfg, 4)
    sd = {'diffuser.dummy': torch.zeros(1)}  # makes the v1.0 layout detectable; skipped
    for prefix, m in (('ctx.text.model.', a), ('ctx.image.model.', b)):
        sd.update({prefix + k: v for k, v in m.state_dict().items()})
        sd[prefix + 'text_model.embeddings.position_ids'] = torch.arange(77)[None]
        sd[prefix + 'vision_model.embeddings.position_ids'] = torch.arange(257)[None]
    out = convert_checkpoint(sd, cfg, skip_parts=['diffuser'])
    t, v = flatten(out['ctx_text']), flatten(out['ctx_image'])
    asd, bsd = a.state_dict(), b.state_dict()
    np.testing.assert_array_equal(t['text_model/encoder/layers_1/self_attn/q_proj/kernel'],
                                  asd['text_model.encoder.layers.1.self_attn.q_proj.weight'].numpy().T)
    np.testing.assert_array_equal(t['text_projection/kernel'], asd['text_projection.weight'].numpy().T)
    np.testing.assert_array_equal(v['vision_model/embeddings/patch_embedding/kernel'],
                                  bsd['vision_model.embeddings.patch_embedding.weight'].numpy()
                                  .transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v['vision_model/pre_layrnorm/scale'],
                                  bsd['vision_model.pre_layrnorm.weight'].numpy())
    np.testing.assert_array_equal(v['visual_projection/kernel'], bsd['visual_projection.weight'].numpy().T)

    from vd_jax.convert.sources import DictSource
    _, plans, _, _ = plan_conversion(DictSource(sd), cfg, skip_parts=['diffuser'])
    ign = dict(plans['ctx_text'].ignored)
    assert 'ctx.text.model.vision_model.encoder.layers.0.mlp.fc1.weight' in ign
    assert 'uses only the text_model' in ign['ctx.text.model.vision_model.encoder.layers.0.mlp.fc1.weight']
    assert 'ctx.text.model.visual_projection.weight' in ign
    assert 'ctx.text.model.logit_scale' in ign
    assert 'ctx.text.model.text_model.embeddings.position_ids' in ign
    ign = dict(plans['ctx_image'].ignored)
    assert 'ctx.image.model.text_model.embeddings.token_embedding.weight' in ign
    assert 'ctx.image.model.text_projection.weight' in ign
    # every source key is either converted or ignored with a reason, never dropped
    for part, pre in (('ctx_text', 'ctx.text.'), ('ctx_image', 'ctx.image.')):
        p = plans[part]
        assert len(p.entries) + len(p.ignored) == sum(k.startswith(pre) for k in sd)


def test_flat_keys_equal_nested(cfg, refs):
    """transformers >= 5.6 bare towers drop the `text_model.`/`vision_model.` level."""
    flat = {}
    for k, v in refs['sd'].items():
        flat[k.replace('text_encoder.text_model.', 'text_encoder.')
              .replace('image_encoder.vision_model.', 'image_encoder.')] = v
    assert 'text_encoder.encoder.layers.0.mlp.fc1.weight' in flat
    out = convert_checkpoint(flat, cfg)
    for part in ('ctx_text', 'ctx_image'):
        a, b = flatten(out[part]), flatten(refs['params'][part])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def _sd_variant(refs, drop=(), change=None, add=None):
    sd = {k: v for k, v in refs['sd'].items() if k not in drop}
    sd.update(change or {})
    sd.update(add or {})
    return sd


def test_bad_sources(cfg, refs):
    tp = 'text_encoder.text_model.'
    with pytest.raises(CheckpointError, match=r'text_model/final_layer_norm/scale'):
        convert_checkpoint(_sd_variant(refs, drop=[tp + 'final_layer_norm.weight']), cfg)
    with pytest.raises(CheckpointError, match=r'text_encoder.text_projection.weight.*shape \(32, 16\)'):
        convert_checkpoint(_sd_variant(refs, change={'text_encoder.text_projection.weight':
                                                     torch.zeros(32, 16)}), cfg)
    # a bare CLIPTextModel has no projection: VD cannot use it
    with pytest.raises(CheckpointError, match=r'text_projection/kernel'):
        convert_checkpoint(_sd_variant(refs, drop=['text_encoder.text_projection.weight']), cfg)
    with pytest.raises(CheckpointError, match=r'text_encoder\.foo\.bar'):
        convert_checkpoint(_sd_variant(refs, add={'text_encoder.foo.bar': torch.zeros(3)}), cfg)
    # a third layer in a 2-layer config: the key is named, not silently dropped
    extra = 'image_encoder.vision_model.encoder.layers.2.mlp.fc1.bias'
    with pytest.raises(CheckpointError, match=r'layers\.2\.mlp\.fc1\.bias -> vision_model/encoder/layers_2'):
        convert_checkpoint(_sd_variant(refs, add={extra: torch.zeros(64)}), cfg)
    with pytest.raises(CheckpointError, match=r'patch_embedding\.weight: shape \(32, 3, 4, 4\)'):
        convert_checkpoint(_sd_variant(refs, change={
            'image_encoder.vision_model.embeddings.patch_embedding.weight': torch.zeros(32, 3, 4, 4)}), cfg)


# ----------------------------------------------------------------------------------------
# Full size (no allocation)
# ----------------------------------------------------------------------------------------

def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class _Shapes(TensorSource):
    def __init__(self, shapes):
        self._s, self.path = shapes, 'vd_keys_fourflow.tsv'

    def keys(self):
        return list(self._s)

    def shape(self, k):
        return self._s[k]

    def dtype(self, k):
        return 'float32'


@pytest.mark.slow
def test_full_size_counts_and_released_keys():
    model = load_config('vd_four_flow').model
    text = abstract_params(text_context(model.ctx.text))
    image = abstract_params(image_context(model.ctx.image))
    assert _count(text) == 123_650_304
    assert _count(image) == 303_966_208
    assert text['text_model']['encoder']['layers_11']['self_attn']['q_proj']['kernel'].shape == (768, 768)
    assert image['vision_model']['embeddings']['patch_embedding']['kernel'].shape == (14, 14, 3, 1024)

    shapes = listing.shapes()
    layout, plans, targets, _ = plan_conversion(_Shapes(shapes), 'vd_four_flow',
                                                parts=['ctx_text', 'ctx_image'])
    assert layout.name == 'vd-v1.0'
    for part, pre, tower, proj in (('ctx_text', 'ctx.text.model.', 'text_model.', 'text_projection.'),
                                   ('ctx_image', 'ctx.image.model.', 'vision_model.', 'visual_projection.')):
        p = plans[part]
        used = {k for k in shapes if k.startswith((pre + tower, pre + proj)) and 'position_ids' not in k}
        assert {e.source_key for e in p.entries} == used
        assert len(p.entries) == len(targets[part])  # every leaf filled, shapes checked by build_plan
        ignored = {k for k, _ in p.ignored}
        assert ignored == {k for k in shapes if k.startswith(pre)} - used
        assert pre + 'logit_scale' in ignored
    # 2 embeddings + 12 x 16 + final LN 2 + projection; 3 + pre-LN 2 + 24 x 16 + post-LN 2 + 1
    assert len(plans['ctx_text'].entries) == 197 and len(plans['ctx_image'].entries) == 392


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor()  # openai/clip-vit-large-patch14 defaults (224, bicubic, CLIP mean/std)


def _hf(processor, image):
    return processor(images=image, return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)


def test_preprocess_matches_clip_image_processor(processor, photo_files):
    for name, path in photo_files.items():
        ours = clip_preprocess(path)
        with Image.open(path) as im:
            ref = _hf(processor, im.convert('RGB'))
        assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
        assert _max(ours, ref) == 0.0, (name, _max(ours, ref))
    # a batch of arrays of different sizes, grey input, PIL input
    arrays = [load_image(photo_files['portrait.jpg']), load_image(photo_files['crop.png'])[..., 0]]
    ours = clip_preprocess(arrays)
    ref = np.concatenate([_hf(processor, Image.fromarray(arrays[0])),
                          _hf(processor, Image.fromarray(arrays[1]).convert('RGB'))])
    assert _max(ours, ref) == 0.0
    with Image.open(photo_files['tall.png']) as im:
        assert _max(clip_preprocess(im), clip_preprocess(photo_files['tall.png'])) == 0


def test_resize_matches_pillow_both_pass_orders():
    rng = np.random.default_rng(0)
    for (H, W, h, w) in [(300, 100, 60, 50), (150, 100, 50, 50), (120, 90, 240, 200), (37, 311, 13, 97),
                         (64, 64, 200, 17), (500, 40, 30, 39)]:
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        np.testing.assert_array_equal(resize_bicubic(img, (h, w)), ref, err_msg=str((H, W, h, w)))


def test_float_input_is_quantised_like_vd(processor, photo_files):
    """Float [0,1] images are quantised as VD's ToPILImage does (uint8(x*255), truncating)
    and then processed like uint8 images."""
    x = load_image(photo_files['landscape.png']).astype(np.float32) / 255
    x = np.clip(x + 0.6 / 255, 0, 1)  # k + 0.6 levels: truncating gives k, rounding k + 1
    u8 = (x * np.float32(255)).astype(np.uint8)
    assert _max(clip_preprocess(x), _hf(processor, Image.fromarray(u8))) == 0.0
    # transformers 5.23 itself, given the float array, rescales by 1/255 twice (anchors §1.6
    # hazard, measured): its pixels, un-normalised, are all below 1/255 -- a near-black image.
    # So never hand VD's float images to CLIPImageProcessor directly.
    hf_float = _hf(processor, x)
    raw = hf_float * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    assert raw.max() < 1.01 / 255


def test_preprocess_bad_input(tmp_path):
    bad = tmp_path / 'notes.png'
    bad.write_text('this is not an image')
    with pytest.raises(InputError, match='notes.png.*not an image'):
        load_image(bad)
    with pytest.raises(InputError, match='notes.png'):
        clip_preprocess(str(bad))
    trunc = tmp_path / 'half.jpg'
    Image.fromarray(_photo(64, 64)).save(trunc, 'JPEG')
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(InputError, match='half.jpg'):
        load_image(trunc)
    with pytest.raises(FileNotFoundError, match='missing.png'):
        load_image(tmp_path / 'missing.png')
    with pytest.raises(ValueError, match=r'image 1: float images must lie in \[0, 1\]'):
        clip_preprocess([np.zeros((8, 8, 3), np.float32), np.full((8, 8, 3), 2.0)])
    with pytest.raises(ValueError, match=r'image 0: expected \(H, W, 3\)'):
        clip_preprocess(np.zeros((8, 8, 4), np.uint8))


@pytest.mark.slow
def test_masked_image_context_matches_hooked_reference(cfg, refs, photo_files):
    """The multi-context demo's masked encoding (`clip.py:_encode_wmask`) rebuilt on
    transformers' own vision model: embeddings times the token mask (a forward hook on the
    embedding layer, as the original swaps its forward), then VD's normalisation, then the
    context times the mask again."""
    import torch.nn.functional as F
    from vd_jax.image_io import clip_token_mask
    vm, size, p = refs['vm'], cfg.ctx.image.image_size, cfg.ctx.image.patch_size
    # square, as the demo's 512x512 inputs
    image = resize_bicubic(load_image(photo_files['landscape.png']), (size, size))
    mask = np.zeros((size, size), np.float32)
    mask[:, : size // 2 + 3] = 1.0  # keep the left part; one patch column half covered
    tm = clip_token_mask(mask, size, p)
    # the original's token mask: bilinear resize, patch means (a stride-p conv of ones), CLS = mean
    mt = F.interpolate(torch.tensor(mask)[None, None], [size, size], mode='bilinear')
    ref_tm = torch.cat([mt.mean().reshape(1), F.avg_pool2d(mt, p, p).flatten()]).numpy()
    np.testing.assert_allclose(tm, ref_tm, atol=1e-6)
    pix = clip_preprocess([image], size=size)
    hook = vm.vision_model.embeddings.register_forward_hook(
        lambda mod, args, out: out * torch.tensor(tm)[None, :, None])
    try:
        with torch.no_grad():
            out = vm(pixel_values=torch.tensor(pix).permute(0, 3, 1, 2))
            z = vm.visual_projection(vm.vision_model.post_layernorm(out.last_hidden_state))
    finally:
        hook.remove()
    ref = (z / z[:, :1].norm(dim=-1, keepdim=True) * torch.tensor(tm)[None, :, None]).numpy()
    model = image_context(cfg.ctx.image)
    ours, _ = model.apply({'params': refs['params']['ctx_image']}, jnp.asarray(pix),
                          jnp.asarray(tm)[None])
    assert _max(ours, ref) < TOL
    plain, _ = model.apply({'params': refs['params']['ctx_image']}, jnp.asarray(pix))
    assert _max(plain, ours) > 1e-2  # the mask matters
    assert clip_token_mask(np.ones((50, 70)), size, p) is None  # all-ones: the demo encodes plainly
