"""The input step: records -> host batches -> global device batches of latents and contexts.

The train step reads, per flow (xtype, ctype), `latent_<xtype>` and `context_<ctype>`:
  latent_image    (B, h, w, 4)   AutoKL latents already times the latent scale (0.18215)
  latent_text     (B, D)         Optimus latents (D = 768; 16 in the tiny configs)
  context_image   (B, 257, 768)  CLIP image context (normalised tokens)
  context_text    (B, 77, 768)   CLIP text context
Three ways to get them (`cfg.data.kind`):
  'encoded'    a dataset written by `vd_jax.data.preencode` with those field names
               (`make_encode_fn` is the matching encoder);
  'images'     image-caption records (`vd_jax.data.build_image_text`, or a raw folder that is
               built on first use): the frozen encoders (AutoKL, CLIP, Optimus) run on device
               inside the input step (`Encoders`); captions are tokenized on the host;
  'synthetic'  `SyntheticLatentSource`, deterministic random latents/contexts (tests, smoke runs).
Each process reads only its share (`make_loader(process_index, process_count)`), and
`vd_jax.sharding.global_batch` assembles the shares into arrays sharded on the batch axis.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from vd_jax import sharding as shd
from vd_jax.train.config import ConfigError, needed_fields

logger = logging.getLogger(__name__)

LATENT_FIELDS = ('latent_image', 'latent_text')
CONTEXT_FIELDS = ('context_image', 'context_text')
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------
# Record shapes and the synthetic source
# ----------------------------------------------------------------------------------------

def record_spec(cfg, flows) -> Dict[str, Tuple[int, ...]]:
    """Per-record shape of every field the flows read, for synthetic data (`cfg.data`)."""
    streams = dict(cfg.model.diffuser.streams)
    d = cfg.data
    spec = {}
    for field in needed_fields(flows):
        if field == 'index':
            continue
        kind, modality = field.split('_', 1)
        s = streams[modality]
        if field == 'latent_image':
            spec[field] = (int(d.latent_size), int(d.latent_size), int(s['in_channels']))
        elif field == 'latent_text':
            spec[field] = (int(np.prod(s['input_channels'])),)
        else:
            spec[field] = (int(d.context_len[modality]), int(s.get('context_dim', 768)))
    return spec


class SyntheticLatentSource:
    """Deterministic random pre-encoded records (a grain random-access source).

    Record i: every field of `spec` ~ N(0, 1) float32 (contexts: each token scaled to unit
    norm, like CLIP contexts), plus 'id'; identical for equal (seed, i) in any process.
    `nan_records` puts NaN into the listed records (divergence tests).
    """

    def __init__(self, num_records: int, spec: Mapping[str, Sequence[int]], seed: int = 0,
                 nan_records: Sequence[int] = ()):
        if num_records <= 0:
            raise ValueError(f'num_records must be positive, got {num_records}')
        self.num_records = int(num_records)
        self.spec = {k: tuple(int(x) for x in v) for k, v in sorted(dict(spec).items())}
        self.seed = int(seed)
        self.nan_records = tuple(sorted(int(i) for i in nan_records))

    def __len__(self):
        return self.num_records

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f'record {index} out of range [0, {self.num_records})')
        rng = np.random.default_rng((self.seed, index))
        out: Dict[str, Any] = {}
        for k, shape in self.spec.items():
            v = rng.standard_normal(shape).astype(np.float32)
            if k.startswith('context_'):
                v /= np.linalg.norm(v, axis=-1, keepdims=True)
            if index in self.nan_records:
                v[...] = np.nan
            out[k] = v
        out['id'] = f'synthetic-latent/{index:08d}'
        return out

    def __repr__(self):  # stable: grain checks it when restoring an iterator state
        return (f'SyntheticLatentSource(num_records={self.num_records}, spec={self.spec}, '
                f'seed={self.seed}, nan_records={self.nan_records})')


# ----------------------------------------------------------------------------------------
# Sources and loaders
# ----------------------------------------------------------------------------------------

def _find_prepared(path: str) -> Optional[str]:
    """`path` itself if it is a prepared tfds folder, else the single one below it."""
    if os.path.isfile(os.path.join(path, 'dataset_info.json')):
        return path
    found = []
    for root, _, files in os.walk(path):
        if 'dataset_info.json' in files:
            found.append(root)
    if len(found) > 1:
        raise ConfigError(f"data.path '{path}' holds several prepared datasets {found}; give one")
    return found[0] if found else None


def make_source(cfg, workdir: str, flows):
    """The random-access record source of `cfg.data`."""
    d = cfg.data
    kind = str(d.kind)
    if kind == 'synthetic':
        return SyntheticLatentSource(int(d.num_records), record_spec(cfg, flows), int(d.seed))
    from vd_jax.data import open_dataset  # noqa: PLC0415 (tfds import is slow)
    if not d.path:
        raise ConfigError(f"data.kind='{kind}' needs data.path")
    if not os.path.exists(d.path):
        raise ConfigError(f"data.path '{d.path}' does not exist")
    prepared = _find_prepared(d.path)
    if kind == 'encoded':
        if prepared is None:
            raise ConfigError(f"data.path '{d.path}' is not a prepared dataset (no "
                              'dataset_info.json): write one with vd_jax.data.preencode')
        return open_dataset(prepared)
    if kind != 'images':
        raise ConfigError(f"data.kind must be 'synthetic', 'encoded' or 'images', got {kind!r}")
    if prepared is not None:
        return open_dataset(prepared)
    from vd_jax.data import Filters, build_image_text  # noqa: PLC0415
    data_dir = d.prepared_dir or os.path.join(workdir, 'data')
    filters = Filters() if d.filters == 'laion' else Filters.none()
    if jax.process_index() == 0:
        logger.info("building the image-caption dataset from '%s' into %s", d.path, data_dir)
        builder = build_image_text(d.path, data_dir, name=d.dataset_name, filters=filters)
    _sync('dataset built')
    if jax.process_index() != 0:
        builder = build_image_text(d.path, data_dir, name=d.dataset_name, filters=filters)
    return builder.as_data_source()['train']


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(name)


def per_process_batch(cfg, mesh) -> int:
    """This process's rows of the global batch (checks divisibility on the way)."""
    b = int(cfg.batch_size)
    shards = shd.batch_shards(mesh, cfg.logical_axis_rules)
    if b % shards:
        raise ConfigError(f'batch_size={b} is not divisible by the {shards} batch shards of the '
                          f'mesh {dict(mesh.shape)}')
    if b % jax.process_count():
        raise ConfigError(f'batch_size={b} is not divisible by {jax.process_count()} processes')
    if int(cfg.microbatches) > 1 and b % (int(cfg.microbatches) * shards):
        raise ConfigError(f'batch_size={b} must be divisible by microbatches x batch shards '
                          f'({cfg.microbatches} x {shards})')
    return b // jax.process_count()


class IndexedSource:
    """A random-access source whose records also carry their own index ('index', int64).

    The train step seeds each example's t and eps with it (`vd_jax.train.step.draw_noise`).
    """

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        record['index'] = np.int64(index)
        return record

    def __repr__(self):
        return f'IndexedSource({self.source!r})'


def make_data_loader(cfg, source, mesh, process_index=None, process_count=None):
    """grain loader of this process's share; `iter(loader)` has get_state/set_state."""
    from vd_jax.data import make_loader  # noqa: PLC0415
    d = cfg.data
    if process_index is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if not isinstance(source, IndexedSource):
        from vd_jax.data.loader import as_source  # noqa: PLC0415
        source = IndexedSource(as_source(source))
    return make_loader(source, batch_size=per_process_batch(cfg, mesh),
                       image_size=int(d.image_size) if d.kind == 'images' else None,
                       seed=int(d.seed), shuffle=bool(d.shuffle), scale=True,
                       random_crop=bool(d.random_crop), process_index=process_index,
                       process_count=process_count, worker_count=int(d.worker_count))


# ----------------------------------------------------------------------------------------
# Host side of a batch
# ----------------------------------------------------------------------------------------

def _index(x) -> np.ndarray:
    # uint32: room for 4.29e9 records (LAION-2B's 2.3e9 would overflow int32); only a seed
    return np.asarray(x, np.int64).astype(np.uint32)


class HostPrep:
    """Loader batch (numpy, strings) -> numeric arrays the device step needs.

    Encoded/synthetic batches keep exactly the needed latent/context fields (float32) and
    'index' (uint32). Image batches keep 'image' and 'index' and gain 'tokens_clip' (CLIP ids
    of the captions) when a flow is conditioned on text and 'tokens_bert' (Optimus encoder
    ids) when a flow outputs text.
    """

    def __init__(self, cfg, flows):
        self.kind = str(cfg.data.kind)
        self.fields = needed_fields(flows)
        self._tok = self._bert = None
        if self.kind == 'images':
            self._init_tokenizers()

    def _init_tokenizers(self):
        if 'context_text' in self.fields:
            from vd_jax.tokenizers import clip_tokenizer  # noqa: PLC0415
            self._tok = clip_tokenizer()
        if 'latent_text' in self.fields:
            from vd_jax.models.optimus import tokenize_for_encoder  # noqa: PLC0415
            self._bert = tokenize_for_encoder

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.kind != 'images':
            missing = [f for f in self.fields if f not in batch]
            if missing:
                raise ConfigError(f'the data lacks field(s) {missing} that the flows need; '
                                  f'records have {sorted(batch)}')
            return {f: _index(batch[f]) if f == 'index' else np.asarray(batch[f], np.float32)
                    for f in self.fields}
        if 'image' not in batch:
            raise ConfigError(f"data.kind='images' but records have no 'image' (fields "
                              f'{sorted(batch)}); use data.kind=encoded for pre-encoded data')
        out = {'image': np.asarray(batch['image'], np.float32)}
        if 'index' in batch:
            out['index'] = np.asarray(batch['index'], np.int32)
        captions = [str(c) for c in batch.get('caption', ())]
        if (self._tok is not None or self._bert is not None) and len(captions) != len(out['image']):
            raise ConfigError(f"flows conditioned on or producing text need a 'caption' per "
                              f'record; records have {sorted(batch)}')
        if self._tok is not None:
            out['tokens_clip'] = np.asarray(self._tok(captions), np.int32)
        if self._bert is not None:
            out['tokens_bert'] = np.asarray(self._bert(captions), np.int32)
        return out


# ----------------------------------------------------------------------------------------
# Frozen encoders (on device)
# ----------------------------------------------------------------------------------------

def _resize_for_clip(images01, size: int):
    """(B, S, S, 3) in [0, 1] -> CLIP pixel values (B, size, size, 3).

    On-device bicubic (antialiased when shrinking) + CLIP mean/std. The sampling pipeline's
    `vd_jax.image_io.clip_preprocess` reproduces the PIL processor bit for bit on the host;
    here a close on-device approximation is used so training does not ship pixels back.
    """
    b = images01.shape[0]
    x = jax.image.resize(images01, (b, size, size, 3), 'bicubic', antialias=True)
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (jnp.clip(x, 0.0, 1.0) - mean) / std


class Encoders:
    """The frozen encoders a set of flows needs, with parameters placed on the mesh.

    `cfg.encoders.ckpt`: a vd_jax checkpoint folder with the parts `vae_image` (image
    latents), `vae_text` (Optimus text latents), `ctx_image`, `ctx_text` (CLIP contexts),
    as many as the flows need; or 'random' for random weights (smoke runs of the tiny
    config only: the latents mean nothing).
    Never trained: they get no gradient and no optimizer state.
    """

    def __init__(self, cfg, flows, mesh):
        from vd_jax.models import clip as clip_lib  # noqa: PLC0415
        from vd_jax.models.vae import AutoencoderKL  # noqa: PLC0415
        self.fields = needed_fields(flows)
        self.mesh = mesh
        self.rules = shd.normalize_rules(cfg.logical_axis_rules)
        self.sample = bool(cfg.encoders.vae_sample)
        model_cfg = cfg.model
        self.modules: Dict[str, nn.Module] = {}
        if 'latent_image' in self.fields:
            self.modules['vae_image'] = AutoencoderKL.from_model_config(model_cfg)
        if 'context_image' in self.fields:
            self.modules['ctx_image'] = clip_lib.image_context(model_cfg.ctx.image)
        if 'context_text' in self.fields:
            self.modules['ctx_text'] = clip_lib.text_context(model_cfg.ctx.text)
        if 'latent_text' in self.fields:
            from vd_jax.models.optimus import Optimus  # noqa: PLC0415
            self.modules['vae_text'] = Optimus.from_model_config(model_cfg)
        self.ckpt = str(cfg.encoders.ckpt)
        if not self.ckpt:
            raise ConfigError("data.kind='images' needs the frozen encoders: set encoders.ckpt "
                              "to a vd_jax checkpoint folder with parts "
                              f"{sorted(self.modules)} (or 'random' for a smoke run)")
        self.params = {name: self._load(name, m) for name, m in self.modules.items()}

    def _abstract(self, name, module):
        from vd_jax.models import clip as clip_lib  # noqa: PLC0415
        with nn.logical_axis_rules(self.rules):
            if name in ('vae_image', 'vae_text'):  # both have init_all()
                v = jax.eval_shape(lambda k: module.init(k, method=type(module).init_all),
                                   jax.random.PRNGKey(0))
            else:
                v = jax.eval_shape(lambda k: module.init(k, clip_lib.dummy_input(module)),
                                   jax.random.PRNGKey(0))
        return v['params']

    def _load(self, name, module):
        from vd_jax.checkpoint import load_part  # noqa: PLC0415
        boxed = self._abstract(name, module)
        shardings = shd.logical_shardings(boxed, self.mesh, self.rules)
        abstract = nn.unbox(boxed)
        if self.ckpt == 'random':
            from vd_jax.models.init import random_params  # noqa: PLC0415
            logger.warning('encoders.ckpt=random: %s has RANDOM weights (smoke run only)', name)
            host = jax.tree_util.tree_map(np.asarray, random_params(abstract, seed=1))
            return jax.tree_util.tree_map(lambda v, s: shd.put_global(v, s), host, shardings)
        # load_part checks every key and shape against the model and reads each device's slice
        return load_part(self.ckpt, name, dtype=np.float32, shardings=shardings,
                         expected=abstract)

    def __call__(self, batch: Dict[str, jax.Array], key) -> Dict[str, jax.Array]:
        """Device batch {'image', 'index', 'tokens_clip', 'tokens_bert'} -> {'index',
        latent_*, context_*} sharded like the batch. One compiled program per set of
        encoders (equal settings in a process share it)."""
        spec = (tuple(sorted(self.modules.items(), key=lambda kv: kv[0])), self.fields,
                self.sample, self.rules)
        with jax.set_mesh(self.mesh):
            return _encode_batch(self.params, batch, key, spec)


@functools.partial(jax.jit, static_argnums=3)
def _encode_batch(params, batch, key, spec):
    modules, fields, sample, rules = spec
    modules = dict(modules)
    out = {}
    images01 = (batch['image'] + 1.0) * 0.5 if 'image' in batch else None
    if 'latent_image' in fields:
        from vd_jax.models.vae import vae_encode  # noqa: PLC0415
        out['latent_image'] = vae_encode(modules['vae_image'], params['vae_image'], images01,
                                         key, sample=sample)
    if 'context_image' in fields:
        m = modules['ctx_image']
        pix = _resize_for_clip(images01, m.config.image_size)
        out['context_image'] = m.apply({'params': params['ctx_image']}, pix)[0]
    if 'context_text' in fields:
        m = modules['ctx_text']
        out['context_text'] = m.apply({'params': params['ctx_text']}, batch['tokens_clip'])[0]
    if 'latent_text' in fields:
        from vd_jax.models.optimus import Optimus  # noqa: PLC0415
        # VD encodes a caption to the posterior mean (no sampling, no scale factor)
        out['latent_text'] = modules['vae_text'].apply(
            {'params': params['vae_text']}, batch['tokens_bert'], method=Optimus.encode)[0]
    if 'index' in batch:
        out['index'] = batch['index']
    with nn.logical_axis_rules(rules):
        return {k: nn.with_logical_constraint(v, ('batch',) + (None,) * (v.ndim - 1))
                for k, v in out.items()}


def make_encode_fn(encoders: Encoders, seed: int = 0):
    """A `vd_jax.data.preencode` encode_fn writing the trainer's field names.

    VAE latents are posterior samples when `encoders.vae_sample` (one fixed draw per record,
    seeded by `seed` and the batch position), else the posterior means.
    """
    tok = HostPrep.__new__(HostPrep)
    tok.kind, tok.fields, tok._tok, tok._bert = 'images', encoders.fields, None, None
    tok._init_tokenizers()
    counter = [0]

    def encode_fn(batch):
        host = tok(batch)
        dev = {k: jnp.asarray(v) for k, v in host.items()}
        key = jax.random.fold_in(jax.random.PRNGKey(seed), counter[0])
        counter[0] += 1
        return {k: np.asarray(v, np.float32) for k, v in encoders(dev, key).items()
                if k != 'index'}
    return encode_fn
