"""CLIP score (prompt-image) and CLIP image-image similarity with the converted CLIP towers.

    from vd_jax.eval.clip_score import CLIPScorer
    scorer = CLIPScorer.from_checkpoint('converted/vd4')        # its ctx_text / ctx_image parts
    s = scorer.clip_score(['a red bicycle', 'a cat'], images)    # (2,) in [0, 100]
    s = scorer.image_similarity(variations, sources)             # (N,) for image variation

Definitions (torchmetrics' `CLIPScore` documentation, Hessel et al. 2021 with w = 100):
  CLIPScore(prompt, image) = 100 * max(cos(text_embeds, image_embeds), 0),
  image similarity         = 100 * max(cos(image_embeds_a, image_embeds_b), 0),
per pair, where text_embeds = text_projection(EOT token) (HF `get_text_features`) and
image_embeds = visual_projection(post_layernorm(CLS)) (HF `get_image_features`): the `aux`
outputs of `CLIPTextContext` / `CLIPImageContext`. Report the mean over pairs.
torchmetrics' aggregate clamps the mean of the unclamped scores instead of each pair
(`clamp=False` returns those, so `max(mean, 0)` reproduces it); the two agree whenever every
cosine is >= 0, as for any real prompt-image pair.

Prompts are tokenized with `vd_jax.tokenizers.clip_tokenizer` (77 tokens, truncated with a
warning); images of any size, uint8 or float in [0, 1], go through
`vd_jax.image_io.clip_preprocess` (transformers' `CLIPImageProcessor`, bit-exact).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.batching import pad_rows
from vd_jax.checkpoint import load_part, read_config
from vd_jax.errors import CheckpointError, InputError
from vd_jax.eval.reference import iter_images, load_fitted
from vd_jax.image_io import clip_preprocess
from vd_jax.models.clip import CLIPImageContext, CLIPTextContext, CLIPTextConfig, CLIPVisionConfig
from vd_jax.tokenizers import clip_tokenizer

SCALE = 100.0


def cosine_score(a, b, clamp: bool = True) -> np.ndarray:
    """100 * cos(a_i, b_i) per row (float64), clamped at 0 unless `clamp=False`.

    a, b: (N, P) embeddings (unnormalised)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f'embeddings must be two (N, P) arrays of one shape, got {a.shape} '
                         f'and {b.shape}')
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    score = SCALE * cos
    return np.maximum(score, 0.0) if clamp else score


def _pad_run(fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn(params, chunk) over fixed-size chunks (the last one padded): one compile per shape."""
    outs = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        k = chunk.shape[0]
        outs.append(np.asarray(fn(params, pad_rows(chunk, k, batch_size)))[:k])
    return np.concatenate(outs)


class CLIPScorer:
    """Jitted, batched CLIP embeddings and scores from converted `ctx_text` / `ctx_image` params.

    Args:
      text_params / image_params: the converted towers (either may be None if unused).
      text_config / image_config: `cfg.model.ctx.text` / `.image` (dicts or the dataclasses).
      batch_size: prompts or images per device call (the last call is padded).
      dtype: compute dtype of the towers.
    """

    def __init__(self, text_params=None, image_params=None, text_config=None, image_config=None,
                 *, batch_size: int = 32, dtype=jnp.float32):
        if text_params is None and image_params is None:
            raise InputError('give at least one of text_params / image_params')
        if batch_size < 1:
            raise InputError(f'batch_size must be >= 1, got {batch_size}')
        self.batch_size = int(batch_size)
        self.text_params, self.image_params = text_params, image_params
        self._text = self._image = None
        if text_params is not None:
            cfg = text_config if isinstance(text_config, CLIPTextConfig) else \
                CLIPTextConfig.from_dict(text_config or {})
            self.text_model = CLIPTextContext(cfg, dtype=dtype)
            self.text_length = cfg.max_position_embeddings
            self._text = jax.jit(lambda p, ids: self.text_model.apply({'params': p}, ids)[1]
                                 ['text_embeds'].astype(jnp.float32))
        if image_params is not None:
            cfg = image_config if isinstance(image_config, CLIPVisionConfig) else \
                CLIPVisionConfig.from_dict(image_config or {})
            self.image_size = cfg.image_size
            self.image_model = CLIPImageContext(cfg, dtype=dtype)
            self._image = jax.jit(lambda p, px: self.image_model.apply({'params': p}, px)[1]
                                  ['image_embeds'].astype(jnp.float32))

    @classmethod
    def from_checkpoint(cls, ckpt: Union[str, os.PathLike], text: bool = True, image: bool = True,
                        **kwargs) -> 'CLIPScorer':
        """From a vd_jax checkpoint folder (its config.json and ctx_text / ctx_image parts)."""
        ckpt = os.fspath(ckpt)
        ctx = read_config(ckpt).get('ctx') or {}
        missing = [s for s, want in (('text', text), ('image', image)) if want and s not in ctx]
        if missing:
            raise CheckpointError(f"checkpoint '{ckpt}' has no CLIP {missing} tower config "
                                  '(config.json ctx.text / ctx.image)')
        return cls(load_part(ckpt, 'ctx_text') if text else None,
                   load_part(ckpt, 'ctx_image') if image else None,
                   ctx['text'] if text else None, ctx['image'] if image else None, **kwargs)

    # ------------------------------------------------------------------------------------
    def text_embeds(self, prompts: Union[str, Sequence[str]]) -> np.ndarray:
        """Prompts -> (N, P) float32 `text_embeds` (unnormalised)."""
        if self._text is None:
            raise InputError('this CLIPScorer has no text tower (text_params=None)')
        tok = clip_tokenizer()
        tok.max_length = self.text_length  # the tower's positions (77 for ViT-L/14)
        ids = tok(prompts)
        return _pad_run(self._text, self.text_params, ids, self.batch_size)

    def image_embeds(self, images) -> np.ndarray:
        """Images (a (B, H, W, 3) array, or a list of arrays / PIL images / files; uint8 or
        float in [0, 1]; any size) -> (N, P) float32 `image_embeds` (unnormalised)."""
        if self._image is None:
            raise InputError('this CLIPScorer has no image tower (image_params=None)')
        pixels = clip_preprocess(images, size=self.image_size)
        return _pad_run(self._image, self.image_params, pixels, self.batch_size)

    def clip_score(self, prompts, images, clamp: bool = True) -> np.ndarray:
        """(N,) CLIPScore of prompt i with image i: 100 * max(cos, 0) (float64)."""
        t = self.text_embeds(prompts)
        i = self.image_embeds(images)
        if t.shape[0] != i.shape[0]:
            raise InputError(f'{t.shape[0]} prompts but {i.shape[0]} images; CLIP scores '
                             'are per (prompt, image) pair')
        return cosine_score(t, i, clamp)

    def image_similarity(self, images_a, images_b, clamp: bool = True) -> np.ndarray:
        """(N,) CLIP image-image similarity of a_i with b_i: 100 * max(cos, 0) (float64)."""
        a = self.image_embeds(images_a)
        b = self.image_embeds(images_b)
        if a.shape[0] != b.shape[0]:
            raise InputError(f'{a.shape[0]} and {b.shape[0]} images; the similarity is per '
                             'pair')
        return cosine_score(a, b, clamp)


# ----------------------------------------------------------------------------------------
# Image files, streamed
# ----------------------------------------------------------------------------------------

def clip_scores(scorer, prompts: Sequence[str], paths: Sequence[str], chunk: int = 256,
                progress: Optional[Callable[[int], None]] = None, clamp: bool = True) -> np.ndarray:
    """(N,) CLIPScore of prompts[i] with the image file paths[i] (float64; `clamp=False`:
    100 * cos without the max(., 0))."""
    out = []
    for k, images in enumerate(iter_images(list(paths), None, chunk)):
        out.append(scorer.clip_score(list(prompts[k * chunk:k * chunk + len(images)]), images,
                                     clamp))
        if progress:
            progress(len(images))
    return np.concatenate(out)


def image_similarities(scorer, sources: Sequence[str], paths: Sequence[str], chunk: int = 256,
                       progress: Optional[Callable[[int], None]] = None,
                       clamp: bool = True) -> np.ndarray:
    """(N,) CLIP image similarity of the image files paths[i] and sources[i] (float64)."""
    out = []
    for k, images in enumerate(iter_images(list(paths), None, chunk)):
        src = [load_fitted(p, None) for p in sources[k * chunk:k * chunk + len(images)]]
        out.append(scorer.image_similarity(images, src, clamp))
        if progress:
            progress(len(images))
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------
# The metric of `python -m vd_jax.eval clip`
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class CLIPMetric:
    """CLIP score of t2i samples with their prompts, or (task 'i2i') CLIP image similarity
    of image variations with their source images.

    task: 't2i' or 'i2i'; towers: a vd_jax checkpoint folder with the CLIP towers, or None
    for the sampled model's own; batch_size: per CLIP call; bar(total, desc): a progress bar
    (a context with update(k)).
    """
    task: str
    bar: Callable
    towers: Optional[str] = None
    batch_size: int = 32

    def load(self) -> None:
        """Nothing to load before the model (the towers may be the model's own)."""

    def prepare(self, hw, folder) -> dict:
        """Nothing to compute before sampling."""
        return {}

    def scorer(self, vd) -> CLIPScorer:
        text = self.task == 't2i'
        kw = dict(batch_size=self.batch_size)
        if self.towers:
            return CLIPScorer.from_checkpoint(self.towers, text=text, **kw)
        p, ctx = vd.params, vd.config['ctx']
        return CLIPScorer(p['ctx_text'] if text else None, p['ctx_image'],
                          ctx['text'] if text else None, ctx['image'], **kw)

    def score(self, vd, paths: Sequence[str], inputs: List[str], folder: str
              ) -> Tuple[dict, str]:
        """Score sample i (paths[i]) with its input inputs[i % P]; writes scores.jsonl (one
        line per sample). Returns (the record's entries, a one-line summary)."""
        scorer = self.scorer(vd)
        n = len(paths)
        expanded = [inputs[i % len(inputs)] for i in range(n)]
        with self.bar(n, 'CLIP') as bar:  # 100 * cos; the score clamps each pair at 0
            cos = (clip_scores(scorer, expanded, paths, progress=bar.update, clamp=False)
                   if self.task == 't2i' else
                   image_similarities(scorer, expanded, paths, progress=bar.update, clamp=False))
        scores = np.maximum(cos, 0.0)
        name = 'clip_score' if self.task == 't2i' else 'clip_image_similarity'
        rec = {name: float(np.mean(scores)), f'{name}_std': float(np.std(scores)),
               f'{name}_unclamped': float(np.mean(cos)),  # tells untrained models apart
               'clip_towers': os.path.abspath(self.towers) if self.towers else "the model's own"}
        with open(os.path.join(folder, 'scores.jsonl'), 'w') as f:
            for i, (s, c) in enumerate(zip(scores, cos)):
                f.write(json.dumps({'index': i, 'input': expanded[i], name: float(s),
                                    f'{name}_unclamped': float(c)}) + '\n')
        return rec, f'{name} = {rec[name]:.4f} (std {rec[name + "_std"]:.4f})'
