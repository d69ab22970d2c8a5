"""What a training run optimises, behind one interface the trainer's step and loop use.

  diffusion   VD's multi-flow epsilon loss on (latent, context) pairs, with classifier-free-
              guidance dropout (the diffuser; the default)
  autokl      the image VAE: reconstruction (L1 or L2) + KL (stage 0)
  optimus     the text VAE: teacher-forced GPT-2 reconstruction + KL with free bits and a
              linear KL warm-up (stage 0)
  clip        both CLIP towers, contrastively on image-caption pairs (stage 0)

An objective is a frozen (hashable) dataclass: a static argument of the jitted step. Every
random draw comes from `fold_in(key, record index)`, so results do not depend on how a batch
is split over devices, processes or microbatches, and a resumed run draws what an
uninterrupted one would. Its parameter tree is what `TrainState.params` holds; `export`
turns it into checkpoint parts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import modalities as M
from vd_jax.diffusion.losses import diffusion_loss, offset_noise
from vd_jax.diffusion.schedule import ScheduleConfig, make_schedule
from vd_jax.errors import ConfigError
from vd_jax.models import family
from vd_jax.train import optim


def per_record_keys(key, index):
    """One key per record: fold_in(key, record index)."""
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(index)


class Objective:
    """Base: subclasses set `parts` and implement `modules`, `loss`, `export`."""
    parts: Tuple[str, ...] = ()

    def modules(self) -> Dict[str, nn.Module]:
        """{subtree name: module} of the parameter tree (one entry: the tree is that module's)."""
        raise NotImplementedError

    def extra_params(self) -> Dict[str, Any]:
        """Parameters outside the modules (e.g. CLIP's logit scale): {name: init value}."""
        return {}

    def _single(self) -> bool:
        return len(self.modules()) == 1 and not self.extra_params()

    def init(self, key, batch: int = 1):
        """The modules' own initialisers (boxed with logical axis names)."""
        out = {}
        for i, (name, m) in enumerate(sorted(self.modules().items())):
            out[name] = m.init(jax.random.fold_in(key, i), batch, method='init_all')['params']
        if self._single():
            return next(iter(out.values()))
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in self.extra_params().items()})
        return out

    def loss(self, params, batch: Mapping[str, jax.Array], key, step) -> Tuple[jax.Array, Dict]:
        """(total loss, {metric: scalar}); metrics named 'loss/<x>' are logged per term."""
        raise NotImplementedError

    def loss_and_grads(self, params, batch, key, step):
        """(metrics incl. 'loss', grads) of one (micro)batch."""
        (total, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batch,
                                                                             key, step)
        return dict(metrics, loss=total), grads

    def group_of(self, path: str) -> str:
        """Parameter group of a '/'-joined path (per-group update multipliers)."""
        return path.split('/')[0] if not self._single() else self.parts[0]

    def export(self, params) -> Dict[str, Any]:
        """{checkpoint part: params}."""
        if self._single():
            return {self.parts[0]: params}
        return {p: params[p] for p in self.parts}

    @property
    def batch_ndims(self) -> Dict[str, int]:
        """{field: ndim} of the device batch this objective reads."""
        raise NotImplementedError

    def host_fields(self, comps, batch) -> Dict[str, np.ndarray]:
        """Numeric arrays from a loader batch (token ids of captions, ...)."""
        return {}

    def latent_scales(self, params, batch) -> Dict[str, float]:
        """{modality: latent_scale_factor} a trained VAE records in its export: 1 / the std of
        its latents on `batch`, so the diffuser sees unit-variance data (SD's 0.18215 was
        found this way)."""
        return {}


# ------------------------------------------------------------------------------------------------
# VD's multi-flow diffusion loss
# ------------------------------------------------------------------------------------------------

def uncond_key(flow_name: str) -> str:
    """Batch field of a flow's unconditional context (a replicated constant (1, L, D))."""
    return f'const/uncond_{flow_name}'


@dataclasses.dataclass(frozen=True)
class Diffusion(Objective):
    """For every flow f = (xtype, ctype): eps loss of the data layers of xtype conditioned on
    the context of ctype, its own t ~ U{0..T-1} and eps ~ N(0, I) per record; the weighted
    per-flow gradients are summed. With `cfg_dropout` p > 0 each record's context is replaced,
    per flow, with probability p by the flow's unconditional context (the batch field
    `uncond_key(flow)`, exactly what the pipeline samples with), so that classifier-free
    guidance has an unconditional model to extrapolate from.

    The target is the schedule's prediction type (eps for VD; v or x0); `snr_gamma` > 0
    weights examples by min-SNR-gamma, `noise_offset` > 0 adds offset noise to the image-like
    (spatial) latents' eps (`vd_jax.diffusion.losses`)."""
    model: Any                                   # vd_jax.models.unet.Diffuser
    flows: Tuple[M.Flow, ...]
    schedule: Any                                # ScheduleConfig (or a legacy (start, end, T))
    fixed_noise: bool = False
    cfg_dropout: float = 0.0
    parts: Tuple[str, ...] = ('diffuser',)
    snr_gamma: float = 0.0
    noise_offset: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, 'schedule', ScheduleConfig.coerce(self.schedule))
        object.__setattr__(self, 'flows', tuple(map(M.flow, self.flows)))

    def modules(self):
        return {'diffuser': self.model}

    def group_of(self, path: str) -> str:
        return optim.group_of(path)

    @property
    def batch_ndims(self):
        out = {'index': 1}
        for f in self.flows:
            out[M.get(f.xtype).latent_field] = M.get(f.xtype).latent_ndim
            out[M.get(f.ctype).context_field] = 3
            if self.cfg_dropout > 0:
                out[uncond_key(f.name)] = 3
        return out

    def draw_noise(self, key, batch):
        """Per flow: (t (B,) int32, eps like the flow's latent), each record's draw from
        fold_in(fold_in(key, flow index), record index)."""
        out = []
        for i, flow in enumerate(self.flows):
            x0 = batch[M.get(flow.xtype).latent_field]

            def one(k, shape=x0.shape[1:]):
                k_t, k_n = jax.random.split(k)
                return (jax.random.randint(k_t, (), 0, self.schedule.timesteps),
                        jax.random.normal(k_n, shape, jnp.float32))
            keys = per_record_keys(jax.random.fold_in(key, i), batch['index'])
            t, eps = jax.vmap(one)(keys)
            if self.noise_offset > 0 and x0.ndim >= 3:   # spatial latents only (not 0-D text)
                eps = eps + jax.vmap(lambda k, s=eps.shape[1:]: offset_noise(
                    jax.random.fold_in(k, 2), (1,) + s, self.noise_offset)[0])(keys)
            out.append((t, eps))
        return out

    def dropped_context(self, key, batch, i: int, name: str, ctx):
        """The flow's contexts with each record's replaced by the unconditional one with
        probability `cfg_dropout` (drawn from fold_in(fold_in(key, 1000 + i), index))."""
        if self.cfg_dropout <= 0:
            return ctx
        keys = per_record_keys(jax.random.fold_in(key, 1000 + i), batch['index'])
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, self.cfg_dropout))(keys)
        u = jnp.broadcast_to(batch[uncond_key(name)].astype(ctx.dtype), ctx.shape)
        return jnp.where(drop[:, None, None], u, ctx)

    def loss_and_grads(self, params, batch, key, step, noise=None):
        del step
        schedule = make_schedule(self.schedule)
        noise = self.draw_noise(key, batch) if noise is None else noise
        metrics, grads, total = {}, None, 0.0
        for i, ((name, xtype, ctype, w), (t, eps)) in enumerate(zip(self.flows, noise)):
            x0 = batch[M.get(xtype).latent_field]
            ctx = self.dropped_context(key, batch, i, name, batch[M.get(ctype).context_field])

            def loss_fn(p, x0=x0, ctx=ctx, t=t, eps=eps, xtype=xtype, ctype=ctype):
                def denoise(x_t, tt):
                    return self.model.apply({'params': p}, x_t, tt, ctx, xtype, ctype)
                return diffusion_loss(denoise, schedule, x0, t, eps, snr_gamma=self.snr_gamma)[0]

            if w == 0.0:  # logged, not trained
                metrics[f'loss/{name}'] = loss_fn(params)
                continue
            loss, g = jax.value_and_grad(loss_fn)(params)
            metrics[f'loss/{name}'] = loss
            total = total + w * loss
            if w != 1.0:
                g = jax.tree_util.tree_map(lambda a, w=w: a * jnp.asarray(w, a.dtype), g)
            grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        if grads is None:
            grads = jax.tree_util.tree_map(jnp.zeros_like, params)
        metrics['loss'] = jnp.asarray(total, jnp.float32)
        return metrics, grads


# ------------------------------------------------------------------------------------------------
# Stage 0: the networks the released weights came with
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AutoKL(Objective):
    """Image VAE: mean |x - x'| (or squared) over pixels of a posterior sample's decoding,
    plus `kl_weight` x the KL to N(0, I) summed over latent dims and divided by the pixels
    per image (LDM's weighting per pixel). Adversarial / perceptual terms are not used."""
    model: Any                                   # vd_jax.models.vae.AutoencoderKL
    kl_weight: float = 1e-6
    recon: str = 'l1'
    crop: int = 0       # > 0: random crops of this side (cheaper; beware GroupNorm statistics)
    parts: Tuple[str, ...] = ('vae_image',)

    def modules(self):
        return {'vae_image': self.model}

    @property
    def batch_ndims(self):
        return {'index': 1, 'image': 4}

    def loss(self, params, batch, key, step):
        del step
        x = batch['image']
        keys = per_record_keys(key, batch['index'])
        if self.crop:  # convolutional, so crops are valid inputs; but GroupNorm normalises over
            # the whole input, so whole images then see other statistics than in training
            c = self.crop

            def crop(k, img):
                oy, ox = jax.random.randint(jax.random.fold_in(k, 1), (2,), 0,
                                            jnp.asarray(img.shape[:2]) - c + 1)
                return jax.lax.dynamic_slice(img, (oy, ox, 0), (c, c, img.shape[2]))
            x = jax.vmap(crop)(keys, x)
        mean, logvar = self.model.apply({'params': params}, x, method='encode')
        eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape))(keys, mean)
        z = mean + jnp.exp(0.5 * logvar) * eps
        rec = self.model.apply({'params': params}, z, method='decode')
        err = jnp.abs(rec - x) if self.recon == 'l1' else jnp.square(rec - x)
        rec_loss = err.mean()
        kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = kl.mean() / float(np.prod(x.shape[1:]))
        return rec_loss + self.kl_weight * kl, {'loss/recon': rec_loss, 'loss/kl': kl,
                                                'latent_std': jnp.std(mean)}

    def latent_scales(self, params, batch):
        mean, _ = jax.jit(lambda p, x: self.model.apply({'params': p}, x, method='encode'))(
            params, batch['image'])
        return {'image': float(1.0 / np.std(np.asarray(mean)))}


def decoder_ids(sentences, gpt2, config) -> np.ndarray:
    """Training targets of the Optimus decoder: <BOS> + BPE(' ' + sentence) + <EOS>, padded
    with <PAD> to `config.max_length` (over-long sentences keep their first tokens and end in
    <EOS>). The leading space makes `vd_jax.text_io.ids_to_text` give the sentence back."""
    out = np.full((len(sentences), config.max_length), config.pad_id, np.int32)
    for i, s in enumerate(sentences):
        body = gpt2.encode(' ' + str(s).strip(), add_special_tokens=False)[:config.max_length - 2]
        row = [config.bos_id] + list(body) + [config.eos_id]
        out[i, :len(row)] = row
    return out


def sampled_candidates(target, valid, vocab_size: int, num_sampled: int, key):
    """The candidates of `Optimus`' sampled softmax.

    target (B, T) token ids, valid (B, T) bool (False: padding). Returns (candidates (U + K,)
    ids, bias (U + K,) added to their logits, target (B, T) as indices into candidates),
    where the first U = B * T slots are the distinct valid targets (sorted; unused slots get
    bias -inf) and the last K are uniform draws from the vocabulary, each with bias
    log((V - n) / K) (n distinct targets), or -inf where a draw repeats a target. Shapes
    are static (jittable); padding positions' indices are meaningless (masked by the caller).
    """
    v = int(vocab_size)
    flat = jnp.where(valid, target, v).reshape(-1)
    pos = jnp.unique(flat, size=flat.size, fill_value=v)          # sorted, sentinel v last
    used = pos < v
    neg = jax.random.randint(key, (int(num_sampled),), 0, v)
    hit = (neg[:, None] == pos[None, :]).any(-1)
    n_used = used.sum()
    log_ratio = jnp.log(jnp.maximum(v - n_used, 1).astype(jnp.float32) / num_sampled)
    cand = jnp.concatenate([jnp.where(used, pos, 0), neg])
    bias = jnp.concatenate([jnp.where(used, 0.0, -jnp.inf),
                            jnp.where(hit, -jnp.inf, log_ratio)]).astype(jnp.float32)
    return cand, bias, jnp.searchsorted(pos, target).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Optimus(Objective):
    """Text VAE: cross-entropy of the teacher-forced GPT-2 decoder on a posterior sample
    (summed over a sentence's tokens, averaged over the batch) + beta x KL, where each latent
    dimension's batch-mean KL counts at least `free_bits` nats (Optimus' dimension-wise
    thresholding, so the decoder cannot ignore z) and beta rises linearly from 0 over
    `warmup_steps` (KL annealing).

    `deterministic_steps` N > 0 first trains a plain autoencoder (z = mu, no KL) for N steps,
    then the VAE above with the KL warm-up counted from N. Measured on the shapes world
    (docs/vd-mini.md, Diagnosis for v3): with posterior noise from step 0 the encoder never
    writes shape, background or size into z (read back at chance); 500 deterministic steps
    first give all five attributes back.

    `sampled_softmax` K > 0 replaces the softmax over the whole GPT-2 vocabulary (50k tokens:
    measured, it is most of the step's time on a small decoder) by a sampled softmax (Jean et
    al. 2015): the candidates are every token the batch's targets use plus K tokens drawn
    uniformly at random from the vocabulary, and the drawn tokens' logits carry
    log(number of other tokens / K), so their sum estimates the rest of the partition
    function and the tokens the data never uses are still pushed down. Decoding always uses
    the full vocabulary. 0: the exact softmax (the default)."""
    model: Any                                   # vd_jax.models.optimus.Optimus
    beta: float = 0.5
    free_bits: float = 0.1
    warmup_steps: int = 1000
    parts: Tuple[str, ...] = ('vae_text',)
    deterministic_steps: int = 0
    sampled_softmax: int = 0

    def modules(self):
        return {'vae_text': self.model}

    @property
    def batch_ndims(self):
        return {'index': 1, 'tokens_bert': 2, 'tokens_gpt2': 2}

    def host_fields(self, comps, batch):
        from vd_jax.text_io import tokenize_for_encoder  # noqa: PLC0415
        caps = [str(c) for c in batch['caption']]
        c = self.model.config
        return {'tokens_bert': tokenize_for_encoder(caps, comps.tokenizer('bert'), c),
                'tokens_gpt2': decoder_ids(caps, comps.tokenizer('gpt2'), c)}

    def loss(self, params, batch, key, step):
        c = self.model.config
        enc, dec = batch['tokens_bert'], batch['tokens_gpt2']
        mu, logvar = self.model.apply({'params': params}, enc, method='encode')
        eps = jax.vmap(lambda k: jax.random.normal(k, mu.shape[1:]))(
            per_record_keys(key, batch['index']))
        stochastic = jnp.asarray(step >= self.deterministic_steps, jnp.float32)
        z = mu + stochastic * jnp.exp(0.5 * logvar) * eps
        target = dec[:, 1:]
        mask = (target != c.pad_id).astype(jnp.float32)
        if self.sampled_softmax:
            # a key no record's posterior sample uses (those are fold_in(key, index) as is)
            neg_key = jax.random.fold_in(jax.random.fold_in(key, 0), 1)
            cand, bias, target = sampled_candidates(target, mask > 0, c.decoder.vocab_size,
                                                    self.sampled_softmax, neg_key)
            logits = self.model.apply({'params': params}, dec[:, :-1], z, cand,
                                      method='decode_logits') + bias
        else:
            logits = self.model.apply({'params': params}, dec[:, :-1], z, method='decode_logits')
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        rec = jnp.sum(nll * mask, axis=1).mean()
        kl_dim = 0.5 * (mu ** 2 + jnp.exp(logvar) - 1.0 - logvar).mean(0)   # (latent,)
        kl = jnp.sum(jnp.maximum(kl_dim, self.free_bits))
        beta = stochastic * self.beta * jnp.minimum(
            1.0, (step - self.deterministic_steps + 1.0) / max(self.warmup_steps, 1))
        acc = jnp.sum((jnp.argmax(logits, -1) == target) * mask) / jnp.maximum(mask.sum(), 1)
        return rec + beta * kl, {'loss/recon': rec, 'loss/kl': jnp.sum(kl_dim),
                                 'token_accuracy': acc, 'beta': beta, 'mu_std': jnp.std(mu)}

    def latent_scales(self, params, batch):
        mu, _ = jax.jit(lambda p, x: self.model.apply({'params': p}, x, method='encode'))(
            params, batch['tokens_bert'])
        return {'text': float(1.0 / np.std(np.asarray(mu)))}


@dataclasses.dataclass(frozen=True)
class CLIP(Objective):
    """Both CLIP towers, with the symmetric InfoNCE loss of CLIP on (image, caption) pairs of
    a batch and a learned temperature (init 1/0.07, clipped at 100 as CLIP)."""
    text: Any                                    # vd_jax.models.clip.CLIPTextContext
    vision: Any                                  # vd_jax.models.clip.CLIPImageContext
    parts: Tuple[str, ...] = ('ctx_text', 'ctx_image')

    def modules(self):
        return {'ctx_text': self.text, 'ctx_image': self.vision}

    def extra_params(self):
        return {'logit_scale': math.log(1 / 0.07)}

    @property
    def batch_ndims(self):
        return {'index': 1, 'image': 4, 'tokens_clip': 2}

    def host_fields(self, comps, batch):
        return {'tokens_clip': comps.tokenizer('clip')([str(c) for c in batch['caption']])}

    def embeds(self, params, batch):
        """(text embeds, image embeds), L2-normalised (B, P)."""
        pixels = M.get('image').train_context_inputs(self.vision, batch)['pixels']
        _, ta = self.text.apply({'params': params['ctx_text']}, batch['tokens_clip'])
        _, ia = self.vision.apply({'params': params['ctx_image']}, pixels)
        t, i = ta['text_embeds'].astype(jnp.float32), ia['image_embeds'].astype(jnp.float32)
        return (t / jnp.linalg.norm(t, axis=-1, keepdims=True),
                i / jnp.linalg.norm(i, axis=-1, keepdims=True))

    def loss(self, params, batch, key, step):
        del key, step
        t, i = self.embeds(params, batch)
        scale = jnp.exp(jnp.minimum(params['logit_scale'], math.log(100.0)))
        logits = scale * t @ i.T
        labels = jnp.arange(t.shape[0])
        lt = -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1).mean()
        li = -jnp.take_along_axis(jax.nn.log_softmax(logits, 0), labels[None], 0).mean()
        acc = (jnp.argmax(logits, 1) == labels).mean()
        return (lt + li) / 2, {'loss/text': lt, 'loss/image': li, 'accuracy': acc,
                               'logit_scale': scale}


OBJECTIVES = ('diffusion', 'autokl', 'optimus', 'clip')


def from_config(cfg, model=None, flows=(), schedule=None) -> Objective:
    """The objective of a training config (`cfg.objective`, settings in `cfg.<objective>`)."""
    name = str(cfg.get('objective', 'diffusion'))
    if name not in OBJECTIVES:
        raise ConfigError(f'objective must be one of {OBJECTIVES}, got {name!r}')
    if name == 'diffusion':
        d = cfg.get('cfg_dropout', {}) or {}
        p = float(d.get('p', 0.0))
        if not 0.0 <= p < 1.0:
            raise ConfigError(f'cfg_dropout.p must be in [0, 1), got {p}')
        gamma = float((cfg.get('loss', {}) or {}).get('snr_gamma', 0.0) or 0.0)
        offset = float(cfg.noise.get('offset', 0.0) or 0.0)
        if gamma < 0 or offset < 0:
            raise ConfigError(f'loss.snr_gamma and noise.offset must be >= 0, got {gamma}, {offset}')
        return Diffusion(model, tuple(flows), schedule, bool(cfg.noise.fixed), p,
                         snr_gamma=gamma, noise_offset=offset)
    mc = cfg.model
    sec = dict(cfg.get(name, {}) or {})
    try:
        if name == 'autokl':
            return AutoKL(family('autokl').build(mc.vae.image), float(sec.get('kl_weight', 1e-6)),
                          str(sec.get('recon', 'l1')), int(sec.get('crop', 0)))
        if name == 'optimus':
            sampled = sec.get('sampled_softmax', 0) or 0
            if isinstance(sampled, bool) or int(sampled) != sampled or int(sampled) < 0:
                raise ConfigError(f'optimus.sampled_softmax = {sampled!r}: the number of sampled '
                                  'tokens is an integer >= 0 (0: the exact softmax)')
            return Optimus(family('optimus').build(mc.vae.text), float(sec.get('beta', 0.5)),
                           float(sec.get('free_bits', 0.1)), int(sec.get('warmup_steps', 1000)),
                           deterministic_steps=int(sec.get('deterministic_steps', 0)),
                           sampled_softmax=int(sampled))
        return CLIP(family('clip_text').build(mc.ctx.text),
                    family('clip_vision').build(mc.ctx.image))
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"objective '{name}' needs its section in the model config: {e}") from None
