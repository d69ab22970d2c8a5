"""The modality registry: everything vd_jax knows about 'image' and 'text', in one place.

A modality is one record: its diffuser stream kind, the model families of its VAE (data in
and out of latent space) and of its context encoder (conditioning), the checkpoint parts and
batch fields named after it, the shape of its latents, how raw inputs become network inputs
(on the host for sampling, on device for training) and its unconditional context under each
convention. The flows (t2i, i2i, i2t, t2t) are every (context, output) pair of modalities.
Checkpoint parts, the needs of each task, training's batch fields and the pipeline's
encoders are all derived from these records; a third modality is one new record plus its
networks (`register`, `vd_jax.models.register_family`).

  modality  stream  VAE part (family)        context part (family)     raw input
  image     '2d'    vae_image (autokl)       ctx_image (clip_vision)   images in [0, 1]
  text      '0d'    vae_text  (optimus)      ctx_text  (clip_text)     strings (or token ids)

A modality also owns the facts the rest of the code asks it for: the width of its contexts
(`context_dim`), its default latent scale (`latent_scale`, VD's `latent_scale_factor`) and
the tokenizers its encoders need (`context_tokenizers`, `latent_tokenizers`, `tokenizer`).

The networks (`vd_jax.models`, `vd_jax.text_io`, `vd_jax.image_io`) are imported inside the
methods that use them: importing them here would add ~0.6 s to the ~3.6 s of
`import vd_jax.modalities` (measured on the 2-core CPU build host), which configs import.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.image_io import CLIP_MEAN, CLIP_STD, clip_preprocess, clip_token_mask

from vd_jax import tokenizers as T

# Unconditional-context conventions: 'v1.0' = the v1.0 demo (empty prompt; zero context for
# image contexts of image outputs; the CLIP context of a black image for image->text);
# 'legacy' (Nov-2022 CLI) and 'diffusers' use the CLIP context of a mid-gray image for every
# image context.
CONVENTIONS = ('v1.0', 'legacy', 'diffusers')


@dataclasses.dataclass(frozen=True)
class Uncond:
    """An unconditional context: `zeros` of the conditional context's shape, or the context
    of a fixed raw input (`raw`, encoded like any input of the modality)."""
    zeros: bool = False
    raw: Any = None


class Modality:
    """Base record of a modality. Subclasses implement the codec methods.

    Attributes:
      name: the modality ('image', 'text'); also the diffuser stream name.
      letter: its letter in flow names ('i' -> 'i2t').
      kind: the diffuser stream kind ('2d' image ResBlocks / '0d' text FCBlocks).
      vae_family / ctx_family: model families (`vd_jax.models.FAMILIES`).
      raw_field: the training record field holding the raw data ('image', 'caption').
      latent_scale: the default factor of VD's latents (`latent_scale_factor`: latents =
        factor x the VAE's own); None for a VAE family that takes no scale.
      context_tokenizers / latent_tokenizers: names of the tokenizers the context encoder /
        the VAE (encoding and decoding) need, built by `tokenizer`.
    """
    name: str = ''
    letter: str = ''
    kind: str = ''
    vae_family: str = ''
    ctx_family: str = ''
    raw_field: str = ''
    latent_scale: Optional[float] = None
    context_tokenizers: Tuple[str, ...] = ()
    latent_tokenizers: Tuple[str, ...] = ()

    # -- derived names -------------------------------------------------------------------------
    @property
    def vae_part(self) -> str:
        return f'vae_{self.name}'

    @property
    def ctx_part(self) -> str:
        return f'ctx_{self.name}'

    @property
    def latent_field(self) -> str:
        return f'latent_{self.name}'

    @property
    def context_field(self) -> str:
        return f'context_{self.name}'

    @property
    def latent_ndim(self) -> int:
        """Rank of a batch of latents: (B, h, w, C) for '2d' streams, (B, C) for '0d'."""
        return {'2d': 4, '0d': 2}[self.kind]

    def __repr__(self):
        return f'<modality {self.name}>'

    # -- shapes ----------------------------------------------------------------------------------
    def latent_shape(self, model_cfg, batch: int, hw: Optional[Tuple[int, int]] = None):
        """(batch, ...) of this modality's latents (hw: output size, for spatial ones)."""
        raise NotImplementedError

    def context_length(self, model_cfg) -> int:
        """Tokens L of this modality's contexts (B, L, D)."""
        raise NotImplementedError

    def context_dim(self, model_cfg) -> Optional[int]:
        """Width D of this modality's contexts (B, L, D): the `context_dim` of the diffuser
        stream whose context layers read them (None if the diffuser has no such stream)."""
        streams = model_cfg['diffuser']['streams']
        if self.name not in streams:
            return None
        # lazy: vd_jax.models pulls in jax, flax (+0.2 s)
        from vd_jax.models import StreamConfig  # noqa: PLC0415
        return StreamConfig.from_dict(self.name, streams[self.name]).context_dim

    def latent_scale_of(self, model_cfg) -> Optional[float]:
        """The model's latent scale of this modality: its `latent_scale_factor` entry, else
        the modality's default `latent_scale`."""
        given = dict(model_cfg.get('latent_scale_factor', {}) or {}).get(self.name)
        return self.latent_scale if given is None else float(given)

    def tokenizer(self, comps, name: str):
        """Build tokenizer `name` (one of this modality's `*_tokenizers`), checked against the
        networks of `comps`; raises ValueError if it does not fit the model's vocabulary."""
        raise KeyError(f"modality '{self.name}' has no tokenizer '{name}'")

    # -- host side (sampling) ----------------------------------------------------------------------
    def context_inputs(self, comps, raw, **kw) -> Dict[str, np.ndarray]:
        """Raw inputs -> the context encoder's input arrays."""
        raise NotImplementedError

    def latent_inputs(self, comps, raw) -> Dict[str, np.ndarray]:
        """Raw inputs -> the VAE encoder's input arrays."""
        raise NotImplementedError

    def decode(self, comps, latents, **kw):
        """Latents -> outputs people use (images in [0, 1], strings)."""
        raise NotImplementedError

    def uncond(self, convention: str, output: str) -> Uncond:
        """The unconditional context for outputs of modality `output`."""
        raise NotImplementedError

    # -- device side (pure, jittable) ---------------------------------------------------------------
    def context(self, module, params, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Context encoder: inputs -> (B, L, D) float32."""
        raise NotImplementedError

    def encode(self, module, params, inputs: Mapping[str, jax.Array], key=None) -> jax.Array:
        """VAE encoder: inputs -> latents (a posterior sample with `key`, else the mean)."""
        raise NotImplementedError

    # -- training records --------------------------------------------------------------------------
    def train_host_fields(self, comps, batch: Mapping[str, np.ndarray], *, context: bool,
                          latent: bool) -> Dict[str, np.ndarray]:
        """Numeric fields the device step needs from a record batch's raw field (e.g. token
        ids of the captions); `context` / `latent`: which encoders will run."""
        return {}

    def train_context_inputs(self, module, batch: Mapping[str, jax.Array]
                             ) -> Dict[str, jax.Array]:
        """Device batch -> inputs of the context encoder `module`."""
        raise NotImplementedError

    def train_latent_inputs(self, module, batch: Mapping[str, jax.Array]
                            ) -> Dict[str, jax.Array]:
        """Device batch -> inputs of the VAE `module`."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------

def _clip_pixels_on_device(images01, size: int):
    """(B, S, S, 3) in [0, 1] -> CLIP pixel values (B, size, size, 3), on device.

    Bicubic (antialiased when shrinking) + CLIP mean/std: a close approximation of
    `vd_jax.image_io.clip_preprocess` (bit-exact with the PIL processor, on the host) so that
    training never ships pixels back to the host."""
    b = images01.shape[0]
    x = jax.image.resize(images01, (b, size, size, 3), 'bicubic', antialias=True)
    return (jnp.clip(x, 0.0, 1.0) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class ImageModality(Modality):
    name, letter, kind = 'image', 'i', '2d'
    vae_family, ctx_family, raw_field = 'autokl', 'clip_vision', 'image'

    @property
    def latent_scale(self) -> float:
        """vd.yaml `latent_scale_factor.image`: SD's kl-f8 factor (`vd_jax.models.vae`)."""
        # lazy: vd_jax.models.vae pulls in jax, flax (+0.2 s)
        from vd_jax.models.vae import LATENT_SCALE  # noqa: PLC0415
        return LATENT_SCALE

    def latent_shape(self, model_cfg, batch, hw=None):
        from vd_jax.models.vae import AutoKLConfig  # noqa: PLC0415
        if hw is None:
            raise ValueError('image latents need the output size (height, width)')
        f = AutoKLConfig.from_dict(model_cfg['vae']['image']).downsample_factor
        channels = model_cfg['diffuser']['streams']['image']['in_channels']
        return (batch, hw[0] // f, hw[1] // f, channels)

    def context_length(self, model_cfg):
        c = model_cfg['ctx']['image']
        return (c['image_size'] // c['patch_size']) ** 2 + 1

    def context_inputs(self, comps, raw, masks=None):
        """raw: images ([0, 1] float / uint8 arrays, PIL images or paths); masks: optional
        keep-mask per image (None = whole image), applied to CLIP's tokens as the demo."""
        c = comps.config['ctx']['image']
        size, patch = int(c['image_size']), int(c['patch_size'])
        out = {'pixels': clip_preprocess(list(raw), size=size)}
        if masks is not None:
            if len(masks) != len(raw):
                raise ValueError(f'{len(masks)} masks for {len(raw)} images')
            tms = [None if m is None else clip_token_mask(m, size, patch) for m in masks]
            if any(t is not None for t in tms):
                n = (size // patch) ** 2 + 1
                out['token_mask'] = np.stack([np.ones(n, np.float32) if t is None else t
                                              for t in tms])
        return out

    def context(self, module, params, inputs):
        return module.apply({'params': params}, inputs['pixels'], inputs.get('token_mask'))[0]

    def latent_inputs(self, comps, raw):
        return {'images01': np.asarray(raw, np.float32)}

    def encode(self, module, params, inputs, key=None):
        return module.apply({'params': params}, inputs['images01'], key,
                            method=type(module).encode_images)

    def decode(self, comps, latents, **kw):
        del kw
        module = comps.module(self.vae_part)
        fn = comps.jit('decode_image', lambda p, z: module.apply({'params': p}, z,
                                                                 method=type(module).decode_latents))
        return np.asarray(fn(comps.params[self.vae_part], latents))

    def uncond(self, convention, output):
        if convention == 'v1.0' and output == 'image':
            return Uncond(zeros=True)
        value = 0.0 if convention == 'v1.0' else 0.5  # v1.0 image->text: black; others: gray
        return Uncond(raw=[np.full((16, 16, 3), value, np.float32)])

    def train_context_inputs(self, module, batch):
        size = int(module.config.image_size)
        return {'pixels': _clip_pixels_on_device((batch['image'] + 1.0) * 0.5, size)}

    def train_latent_inputs(self, module, batch):
        return {'images01': (batch['image'] + 1.0) * 0.5}


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------

class TextModality(Modality):
    name, letter, kind = 'text', 't', '0d'
    vae_family, ctx_family, raw_field = 'optimus', 'clip_text', 'caption'
    latent_scale = 1.0  # vd.yaml: text latents are used unscaled
    context_tokenizers = ('clip',)           # prompts -> CLIP token ids
    latent_tokenizers = ('bert', 'gpt2')     # Optimus: BERT encoder in, GPT-2 decoder out

    def tokenizer(self, comps, name):
        if name == 'clip':
            tok = T.clip_tokenizer()
            c = comps.config['ctx'][self.name]
            tok.max_length = int(c['max_position_embeddings'])
            if len(tok) > int(c['vocab_size']):
                raise ValueError(f"the CLIP tokenizer has {len(tok)} tokens but the model's "
                                 f"text encoder has a {c['vocab_size']}-token vocabulary")
            return tok
        if name in self.latent_tokenizers:
            # lazy: vd_jax.text_io pulls in jax, flax (+0.2 s)
            from vd_jax.text_io import check_vocabularies  # noqa: PLC0415
            tok = T.bert_tokenizer() if name == 'bert' else T.gpt2_tokenizer()
            check_vocabularies(comps.module(self.vae_part).config, **{name: tok})
            return tok
        return super().tokenizer(comps, name)

    def latent_shape(self, model_cfg, batch, hw=None):
        del hw
        return (batch, int(model_cfg['diffuser']['streams']['text']['input_channels']))

    def context_length(self, model_cfg):
        return int(model_cfg['ctx']['text']['max_position_embeddings'])

    def context_inputs(self, comps, raw, **kw):
        """raw: strings, or token ids (B, L) int (`vd_jax.tokenizers.clip_tokenizer`)."""
        del kw
        length = self.context_length(comps.config)
        if isinstance(raw, np.ndarray) and np.issubdtype(raw.dtype, np.integer):
            ids = raw
        elif raw and not isinstance(raw[0], str):
            ids = np.asarray(raw)
        else:
            ids = comps.tokenizer('clip')([str(p) for p in raw])
        if ids.ndim != 2 or ids.shape[1] != length:
            raise ValueError(f'CLIP token ids must be (B, {length}), got shape {ids.shape}')
        vocab = int(comps.config['ctx']['text']['vocab_size'])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f'CLIP token ids must lie in [0, {vocab}) (the model\'s '
                             f'vocabulary), got [{ids.min()}, {ids.max()}]')
        return {'ids': ids.astype(np.int32)}

    def context(self, module, params, inputs):
        return module.apply({'params': params}, inputs['ids'])[0]

    def latent_inputs(self, comps, raw):
        from vd_jax.text_io import tokenize_for_encoder  # noqa: PLC0415
        module = comps.module(self.vae_part)
        return {'ids': tokenize_for_encoder([str(s) for s in raw], comps.tokenizer('bert'),
                                            module.config)}

    def encode(self, module, params, inputs, key=None):
        # VD encodes a sentence to the posterior mean (no sampling), times latent_scale_factor
        # text (1 for the released model)
        del key
        mu = module.apply({'params': params}, inputs['ids'], method=type(module).encode)[0]
        return mu * module.latent_scale

    def decode(self, comps, latents, *, method='sample', seed=0, temperature=1.0, top_k=0,
               top_p=1.0, beam_size=4, remove_duplicates=True, seeds=None):
        """Optimus latents -> sentences. The original samples (temperature 1); each row's
        randomness comes from `seeds[i]` (default `seed + i`)."""
        from vd_jax.text_io import decode_latent  # noqa: PLC0415
        z = jnp.asarray(latents)
        seeds = seed + np.arange(z.shape[0]) if seeds is None else np.asarray(seeds)
        return decode_latent(comps.module(self.vae_part), comps.params[self.vae_part], z,
                             method=method, seeds=seeds, temperature=temperature, top_k=top_k,
                             top_p=top_p, beam_size=beam_size,
                             remove_duplicates=remove_duplicates,
                             tokenizer=comps.tokenizer('gpt2'))

    def uncond(self, convention, output):
        return Uncond(raw=[''])  # the empty prompt, in every convention

    def train_host_fields(self, comps, batch, *, context, latent):
        captions = [str(c) for c in batch['caption']]
        out = {}
        if context:
            out['tokens_clip'] = self.context_inputs(comps, captions)['ids']
        if latent:
            out['tokens_bert'] = self.latent_inputs(comps, captions)['ids']
        return out

    def train_context_inputs(self, module, batch):
        return {'ids': batch['tokens_clip']}

    def train_latent_inputs(self, module, batch):
        return {'ids': batch['tokens_bert']}


# ------------------------------------------------------------------------------------------------
# The registry and what is derived from it
# ------------------------------------------------------------------------------------------------

MODALITIES: Dict[str, Modality] = {}


class Flow(NamedTuple):
    """Generate modality `xtype` conditioned on modality `ctype` (name: 't2i', ...).

    A NamedTuple, so code that unpacks `(name, xtype, ctype, weight)` keeps working; new code
    reads the attributes. `weight` scales the flow's loss in training (1 in `FLOWS`; a run's
    weights come from `flow_weights`, `f._replace(weight=w)`)."""
    name: str
    xtype: str
    ctype: str
    weight: float = 1.0

    @property
    def parts(self) -> Tuple[str, ...]:
        """Checkpoint parts a flow needs end to end: diffuser, the context encoder of ctype,
        the VAE of xtype."""
        return ('diffuser', MODALITIES[self.ctype].ctx_part, MODALITIES[self.xtype].vae_part)


FLOWS: Dict[str, Flow] = {}
PARTS: Tuple[str, ...] = ()


def register(modality: Modality) -> Modality:
    """Add a modality: its flows with every registered modality and its parts appear."""
    global PARTS
    if not modality.name.isidentifier() or modality.name in MODALITIES:
        raise ValueError(f'modality name {modality.name!r} must be a new identifier')
    if any(m.letter == modality.letter for m in MODALITIES.values()):
        raise ValueError(f'modality letter {modality.letter!r} is taken')
    MODALITIES[modality.name] = modality
    for c in MODALITIES.values():
        for x in MODALITIES.values():
            name = f'{c.letter}2{x.letter}'
            FLOWS.setdefault(name, Flow(name, x.name, c.name))
    ms = list(MODALITIES.values())
    PARTS = ('diffuser',) + tuple(m.vae_part for m in ms) + tuple(m.ctx_part for m in ms)
    return modality


def unregister(name: str) -> None:
    """Remove a modality and its flows (tests of toy modalities)."""
    global PARTS
    m = MODALITIES.pop(name)
    for k in [k for k, f in FLOWS.items() if name in (f.xtype, f.ctype)]:
        del FLOWS[k]
    ms = list(MODALITIES.values())
    PARTS = ('diffuser',) + tuple(x.vae_part for x in ms) + tuple(x.ctx_part for x in ms)
    del m


register(ImageModality())
register(TextModality())


def get(name: str) -> Modality:
    if name not in MODALITIES:
        raise KeyError(f"unknown modality '{name}' (known: {sorted(MODALITIES)})")
    return MODALITIES[name]


def flow(name_or_pair) -> Flow:
    """A flow by name ('t2i'), by (xtype, ctype), or a (name, xtype, ctype, weight) tuple."""
    if isinstance(name_or_pair, Flow):
        return name_or_pair
    if isinstance(name_or_pair, tuple) and len(name_or_pair) == 4:
        return Flow(*name_or_pair)
    if isinstance(name_or_pair, str):
        if name_or_pair not in FLOWS:
            raise KeyError(f"unknown flow '{name_or_pair}' (flows: {sorted(FLOWS)})")
        return FLOWS[name_or_pair]
    xtype, ctype = name_or_pair
    for f in FLOWS.values():
        if (f.xtype, f.ctype) == (xtype, ctype):
            return f
    raise KeyError(f'no flow from {ctype} to {xtype}')


def parts_of(flows: Sequence) -> Tuple[str, ...]:
    """Checkpoint parts a set of flows needs, in `PARTS` order."""
    need = {p for f in flows for p in flow(f).parts}
    return tuple(p for p in PARTS if p in need)


def part_family(part: str) -> str:
    """The model family of a checkpoint part."""
    if part == 'diffuser':
        return 'diffuser'
    kind, _, name = part.partition('_')
    m = get(name)
    return {'vae': m.vae_family, 'ctx': m.ctx_family}[kind]


def part_section(model_cfg, part: str):
    """The config section a part is built from: diffuser, vae.<m>, ctx.<m>."""
    if part == 'diffuser':
        return model_cfg['diffuser']
    kind, _, name = part.partition('_')
    if kind not in ('vae', 'ctx') or name not in MODALITIES:
        raise KeyError(f"unknown part '{part}' (parts: {PARTS})")
    section = model_cfg.get(kind, {}) if hasattr(model_cfg, 'get') else model_cfg[kind]
    if name not in section:
        raise KeyError(f"the model config has no {kind}.{name} section (part '{part}')")
    return section[name]


def config_parts(model_cfg) -> Tuple[str, ...]:
    """Parts a model config defines (in `PARTS` order)."""
    out = []
    for p in PARTS:
        try:
            part_section(model_cfg, p)
        except KeyError:
            continue
        out.append(p)
    return tuple(out)


def model_flows(model_cfg) -> Tuple[Flow, ...]:
    """Flows the diffuser of a model config can run (data layers of x, context layers of c)."""
    streams = dict(model_cfg['diffuser']['streams'])

    def has(m, part):
        return m in streams and part in list(streams[m]['parts'])
    return tuple(f for f in FLOWS.values() if has(f.xtype, 'data') and has(f.ctype, 'context'))
