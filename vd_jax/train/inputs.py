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
               inside the input step (`FrozenEncoders`, over `vd_jax.components`); captions are
               tokenized on the host (`HostPrep`);
  'synthetic'  `SyntheticLatentSource`, deterministic random latents/contexts (tests, smoke runs).
Each process reads only its share (`make_loader(process_index, process_count)`), and
`vd_jax.sharding.global_batch` assembles the shares into arrays sharded on the batch axis.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vd_jax import modalities as M
from vd_jax import sharding as shd
from vd_jax.checkpoint import available_parts, load_part, read_config
from vd_jax.components import Components
from vd_jax.errors import ConfigError
from vd_jax.models.init import random_params
from vd_jax.models.unet import StreamConfig
from vd_jax.train.settings import needed_fields

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Record shapes and the synthetic source
# ----------------------------------------------------------------------------------------

def record_spec(cfg, flows) -> Dict[str, Tuple[int, ...]]:
    """Per-record shape of every field the flows read, for synthetic data (`cfg.data`:
    `latent_size` = side of spatial ('2d') latents, `context_len` per context modality)."""
    streams = dict(cfg.model.diffuser.streams)
    d = cfg.data
    spec = {}
    for f in map(M.flow, flows):
        x, c = M.get(f.xtype), M.get(f.ctype)
        channels = StreamConfig.from_dict(x.name, streams[x.name]).in_channels
        spec[x.latent_field] = ((int(d.latent_size),) * 2 + (channels,) if x.kind == '2d'
                                else (channels,))
        spec[c.context_field] = (int(d.context_len[c.name]), c.context_dim(cfg.model))
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
    if d.get('hard_negatives', 0):  # checked before the dataset is built
        from vd_jax.data.hard_negatives import check_config  # noqa: PLC0415 (lazy: tfds)
        check_config(d, int(cfg.batch_size) // jax.process_count())
    if kind == 'synthetic':
        return SyntheticLatentSource(int(d.num_records), record_spec(cfg, flows), int(d.seed))
    if kind == 'shapes':  # the generated world (vd_jax.data.shapes), built on first use
        # lazy: vd_jax.data.shapes pulls in tensorflow_datasets, grain, orbax, ... (+0.5 s)
        from vd_jax.data.shapes import build_shapes  # noqa: PLC0415
        data_dir = d.path or d.prepared_dir or os.path.join(workdir, 'data')
        if jax.process_index() == 0:
            build_shapes(data_dir, num_train=int(d.num_records), seed=int(d.seed))
        sync_processes('dataset built')
        return build_shapes(data_dir, num_train=int(d.num_records),
                            seed=int(d.seed)).as_data_source()['train']
    # lazy: vd_jax.data pulls in tensorflow_datasets, grain, orbax, ... (+0.4 s)
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
        raise ConfigError(f"data.kind must be 'synthetic', 'encoded', 'images' or 'shapes', got "
                          f'{kind!r}')
    if prepared is not None:
        return open_dataset(prepared)
    from vd_jax.data import Filters, build_image_text  # noqa: PLC0415
    data_dir = d.prepared_dir or os.path.join(workdir, 'data')
    filters = Filters() if d.filters == 'laion' else Filters.none()
    if jax.process_index() == 0:
        logger.info("building the image-caption dataset from '%s' into %s", d.path, data_dir)
        builder = build_image_text(d.path, data_dir, name=d.dataset_name, filters=filters)
    sync_processes('dataset built')
    if jax.process_index() != 0:
        builder = build_image_text(d.path, data_dir, name=d.dataset_name, filters=filters)
    return builder.as_data_source()['train']


def sync_processes(name: str):
    """A barrier over all processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
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
        # lazy: vd_jax.data.loader pulls in tensorflow_datasets, grain, orbax, ... (+0.4 s)
        from vd_jax.data.loader import as_source  # noqa: PLC0415
        source = IndexedSource(as_source(source))
    batch_size = per_process_batch(cfg, mesh)
    regroup = None
    if d.get('hard_negatives', 0):  # groups of k neighbours per batch (shapes world only)
        from vd_jax.data.hard_negatives import from_config  # noqa: PLC0415 (lazy: tfds)
        regroup = from_config(d, batch_size, source.source)
    return make_loader(source, batch_size=batch_size,
                       image_size=int(d.image_size) if d.kind in ('images', 'shapes') else None,
                       seed=int(d.seed), shuffle=bool(d.shuffle), scale=True,
                       random_crop=bool(d.random_crop), process_index=process_index,
                       process_count=process_count, worker_count=int(d.worker_count),
                       regroup=regroup)


# ----------------------------------------------------------------------------------------
# Host side of a batch
# ----------------------------------------------------------------------------------------

def _index(x) -> np.ndarray:
    # uint32 on every path (one traced program): room for 4.29e9 records (LAION-2B's 2.3e9
    # would overflow int32); only a seed
    return np.asarray(x, np.int64).astype(np.uint32)


class HostPrep:
    """Loader batch (numpy, strings) -> numeric arrays the device step needs.

    Encoded/synthetic batches keep exactly the needed latent/context fields (float32) and
    'index' (uint32). Image batches keep 'image' and 'index' and gain, per modality, what its
    encoders need from the raw field (`Modality.train_host_fields`: e.g. 'tokens_clip' when a
    flow is conditioned on text, 'tokens_bert' when a flow outputs text).

    Args:
      kind: cfg.data.kind; fields: the batch fields the flows read (`needed_fields`);
      components: the `Components` whose tokenizers encode raw fields (kind 'images').
    """

    def __init__(self, kind: str, fields: Sequence[str], components=None):
        self.kind, self.fields, self.components = str(kind), tuple(fields), components
        if self.kind in ('images', 'shapes') and components is None:
            raise ValueError("HostPrep for data.kind='images' needs the frozen encoders' components")

    @classmethod
    def from_config(cls, cfg, flows, components=None) -> 'HostPrep':
        return cls(cfg.data.kind, needed_fields(flows), components)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.kind not in ('images', 'shapes'):
            missing = [f for f in self.fields if f not in batch]
            if missing:
                raise ConfigError(f'the data lacks field(s) {missing} that the flows need; '
                                  f'records have {sorted(batch)}')
            return {f: _index(batch[f]) if f == 'index' else np.asarray(batch[f], np.float32)
                    for f in self.fields}
        out = {}
        if 'index' in batch:
            out['index'] = _index(batch['index'])
        for m in M.MODALITIES.values():
            ctx, lat = m.context_field in self.fields, m.latent_field in self.fields
            if not (ctx or lat):
                continue
            if m.raw_field not in batch:
                raise ConfigError(f"flows {'conditioned on' if ctx else 'producing'} {m.name} "
                                  f"need a '{m.raw_field}' per record; records have "
                                  f'{sorted(batch)}')
            if m.raw_field == 'image':
                out['image'] = np.asarray(batch['image'], np.float32)
            out.update(m.train_host_fields(self.components, batch, context=ctx, latent=lat))
        return out


class ObjectivePrep:
    """Loader batch -> the numeric fields a stage-0 objective reads: 'index', 'image' (if the
    objective reads images) and what `objective.host_fields` makes (token ids of captions)."""

    def __init__(self, objective, components):
        self.objective, self.components = objective, components
        self.fields = tuple(objective.batch_ndims)

    def __call__(self, batch):
        out = {'index': _index(batch['index'])} if 'index' in batch else {}
        if 'image' in self.fields:
            if 'image' not in batch:
                raise ConfigError(f"objective '{type(self.objective).__name__}' reads images; "
                                  f'records have {sorted(batch)}')
            out['image'] = np.asarray(batch['image'], np.float32)
        if any(f.startswith('tokens_') for f in self.fields):
            if 'caption' not in batch:
                raise ConfigError(f"objective '{type(self.objective).__name__}' reads captions; "
                                  f'records have {sorted(batch)}')
            out.update(self.objective.host_fields(self.components, batch))
        return {k: v for k, v in out.items() if k in self.fields}


def tokenizer_components(model_cfg):
    """Components without weights: the tokenizers of a model config, checked against it."""
    return Components(model_cfg, {})


def adopt_encoder_scales(cfg) -> None:
    """Use the latent scale factors of the checkpoints the frozen VAEs come from.

    A VAE trained here records the factor that brings its latents to unit variance in its
    export's config (`latent_scale_factor`); the diffuser must be trained and sampled with
    that same factor, so it is copied into `cfg.model` (which the export writes)."""
    for folder in checkpoint_folders(cfg.encoders.get('ckpt', '')):
        src = read_config(folder).get('latent_scale_factor', {}) or {}
        for part in available_parts(folder):
            m = part[4:] if part.startswith('vae_') else None
            if m and m in src and float(src[m]) != float(cfg.model.latent_scale_factor.get(m, 1.0)):
                logger.info("latent_scale_factor.%s = %.6g from '%s'", m, float(src[m]), folder)
                cfg.model.latent_scale_factor[m] = float(src[m])


def checkpoint_folders(spec) -> Tuple[str, ...]:
    """`encoders.ckpt`: one folder, several separated by commas (or a list), or 'random'."""
    if not spec or spec == 'random':
        return ()
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(',')
    return tuple(str(i).strip() for i in items if str(i).strip())


# ----------------------------------------------------------------------------------------
# Frozen encoders (on device)
# ----------------------------------------------------------------------------------------

def frozen_parts(flows) -> Tuple[str, ...]:
    """The encoder parts (VAEs, context encoders) a set of flows needs: everything
    `modalities.parts_of` lists except the diffuser."""
    return tuple(p for p in M.parts_of([M.flow(f).name for f in flows]) if p != 'diffuser')


class FrozenEncoders:
    """The frozen encoders a set of flows needs, as `vd_jax.components.Components` on the mesh.

    `ckpt`: a vd_jax checkpoint folder with the parts the flows need (e.g. a converted
    release), or 'random' for random weights (smoke runs: the latents mean nothing).
    Never trained: they get no gradient and no optimizer state. `params` are what the
    export writes next to the diffuser, so a trained model samples with exactly them.
    """

    def __init__(self, model_cfg, flows, mesh, rules, ckpt: str, vae_sample: bool = True,
                 seed: int = 1):
        self.fields = needed_fields(flows)
        self.flows = tuple(map(M.flow, flows))
        self.parts = frozen_parts(flows)
        self.sample = bool(vae_sample)
        self.ckpt = str(ckpt)
        if not self.ckpt:
            raise ConfigError("the frozen encoders need weights: set encoders.ckpt to a vd_jax "
                              f"checkpoint folder with parts {list(self.parts)} (or 'random' for "
                              'a smoke run)')
        self.components = Components(model_cfg, {}, mesh=mesh, rules=rules)
        for part in self.parts:
            self.components.params[part] = self._load(part)

    def _load(self, part):
        comps = self.components
        shardings = comps.shardings(part)
        abstract = comps.abstract_params([part])[part]
        if self.ckpt == 'random':
            logger.warning('encoders.ckpt=random: %s has RANDOM weights (smoke run only)', part)
            host = jax.tree_util.tree_map(np.asarray, random_params(abstract, seed=1))
            return jax.tree_util.tree_map(lambda v, s: shd.put_global(v, s), host, shardings)
        # load_part checks every key and shape against the model and reads each device's slice
        folders = checkpoint_folders(self.ckpt)
        have = [f for f in folders if part in available_parts(f)]
        if not have:
            raise ConfigError(f"encoders.ckpt {list(folders)}: no folder has the part '{part}' "
                              f'that the flows need (parts needed: {list(self.parts)})')
        return load_part(have[0], part, dtype=np.float32, shardings=shardings,
                         expected=abstract)

    @property
    def params(self) -> Dict[str, Any]:
        return self.components.params

    def host_prep(self, kind: str = 'images') -> HostPrep:
        return HostPrep(kind, self.fields, self.components)

    def __call__(self, batch: Dict[str, jax.Array], key) -> Dict[str, jax.Array]:
        """Device batch {'image', 'index', 'tokens_*'} -> {'index', latent_*, context_*}
        sharded like the batch. One compiled program per set of encoders."""
        comps = self.components
        static = (tuple((p, comps.module(p)) for p in self.parts), self.fields, self.sample,
                  comps.rules)
        with jax.set_mesh(comps.mesh):
            return _encode_batch(comps.params, batch, key, static)

    def uncond_contexts(self, convention: str = 'v1.0') -> Dict[str, jax.Array]:
        """{'<ctype>-><xtype>': (1, L, D)} the unconditional context of each flow, exactly as
        the pipeline samples with (`Components.uncond_context`)."""
        out = {}
        config = self.components.config
        for f in self.flows:
            m = M.get(f.ctype)
            like = jnp.zeros((1, m.context_length(config), m.context_dim(config)), jnp.float32)
            out[f.name] = self.components.uncond_context(f.ctype, f.xtype, convention, like)
        return out


@functools.partial(jax.jit, static_argnums=3)
def _encode_batch(params, batch, key, static):
    modules, fields, sample, rules = static
    modules = dict(modules)
    out = {}
    for m in M.MODALITIES.values():
        if m.latent_field in fields:
            vae = modules[m.vae_part]
            out[m.latent_field] = m.encode(vae, params[m.vae_part],
                                           m.train_latent_inputs(vae, batch),
                                           key if sample else None)
        if m.context_field in fields:
            enc = modules[m.ctx_part]
            out[m.context_field] = m.context(enc, params[m.ctx_part],
                                             m.train_context_inputs(enc, batch))
    if 'index' in batch:
        out['index'] = batch['index']
    with nn.logical_axis_rules(rules):
        return {k: nn.with_logical_constraint(v, ('batch',) + (None,) * (v.ndim - 1))
                for k, v in out.items()}


def make_encode_fn(encoders: FrozenEncoders, seed: int = 0):
    """A `vd_jax.data.preencode` encode_fn writing the trainer's field names.

    VAE latents are posterior samples when `encoders.vae_sample` (one fixed draw per record,
    seeded by `seed` and the batch position), else the posterior means.
    """
    prep = encoders.host_prep('images')
    counter = [0]

    def encode_fn(batch):
        host = prep(batch)
        dev = {k: jnp.asarray(v) for k, v in host.items()}
        key = jax.random.fold_in(jax.random.PRNGKey(seed), counter[0])
        counter[0] += 1
        return {k: np.asarray(v, np.float32) for k, v in encoders(dev, key).items()
                if k != 'index'}
    return encode_fn
