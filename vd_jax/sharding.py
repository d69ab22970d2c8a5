"""Device meshes, and the one place where logical axis names become shardings.

Model code names the axes of its parameters and activations with the logical vocabulary of
`vd_jax.sharding_names` (`nn.with_logical_partitioning` in `models/layers.py`,
`nn.with_logical_constraint` at block boundaries in `models/unet.py`). The config maps those
names onto mesh axes (`logical_axis_rules`, maxdiffusion/Flax lm1b style), and this module
resolves them, always in the same order:

  jax.eval_shape(init) -> nn.get_partition_spec -> nn.logical_to_mesh_sharding
      -> divisibility check (a dimension its mesh axes do not divide is replicated, logged)
      -> jax.jit(init, out_shardings=...)

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data
parallel too, but parameters and optimizer state are sharded over it: ZeRO-3 / FSDP) and
`model` (tensor parallelism; size 1 unless configured). The batch is split over `data` x
`fsdp`, so every device sees a distinct slice. Only `jit` with `NamedSharding`s is used (no
`pmap`), so the same program runs on 1 device, 8 devices or several hosts.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vd_jax.checkpoint import path_str
from vd_jax import sharding_names as ax
from vd_jax.errors import ConfigError

logger = logging.getLogger(__name__)

DATA, FSDP, MODEL = 'data', 'fsdp', 'model'
MESH_AXES = (DATA, FSDP, MODEL)

# Logical name -> mesh axes, in priority order (flax semantics: the first rule whose mesh axes
# are still free in that array wins). Kernels shard their input-feature dimension over `fsdp`
# and their output features over `model`; norms and biases of `model`-sharded outputs follow.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    (ax.BATCH, (DATA, FSDP)),
    (ax.EMBED, FSDP),
    (ax.CONV_IN, FSDP),
    (ax.MLP, MODEL),
    (ax.CONV_OUT, MODEL),
    (ax.VOCAB, MODEL),
    (ax.NORM, None),
    (ax.LENGTH, None),
    (ax.HEIGHT, None),
    (ax.WIDTH, None),
    (ax.ACT_EMBED, None),
)


# ----------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------

def mesh_shape(shape: Mapping[str, int], num_devices: int) -> Dict[str, int]:
    """Fill the one -1 entry of {axis: size} so the sizes multiply to `num_devices`."""
    shape = {k: int(v) for k, v in dict(shape).items()}
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ConfigError(f'unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}')
    shape = {k: shape.get(k, 1) for k in MESH_AXES}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f'at most one mesh axis may be -1, got {shape}')
    bad = [k for k, v in shape.items() if v == 0 or v < -1]
    if bad:
        raise ConfigError(f'mesh axis sizes must be positive (or one -1), got {shape}')
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f'mesh {shape}: {num_devices} devices are not divisible by the '
                              f'fixed axes (product {fixed})')
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f'mesh {shape} has {math.prod(shape.values())} positions but there '
                          f'are {num_devices} devices; sizes must multiply to the device count '
                          '(use -1 for one axis)')
    return shape


def create_mesh(shape: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'model').

    Args:
      shape: {axis: size}; missing axes are 1, one axis may be -1 (all remaining devices).
      devices: default `jax.devices()` (all processes' devices).
    `mesh_utils.create_device_mesh` orders devices so the axes map onto the physical
    topology (process-major on CPU/GPU hosts: with the data axis outermost, each process
    holds a contiguous part of the batch, which `make_array_from_process_local_data` needs).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    dims = tuple(sizes[a] for a in MESH_AXES)
    try:
        arr = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError) as e:  # odd topologies
        logger.warning('create_device_mesh(%s) failed (%s); using device order', dims, e)
        arr = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(arr, MESH_AXES)


# ----------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------

def normalize_rules(rules) -> Tuple[Tuple[str, Any], ...]:
    """Rules from a config (lists, ConfigDict tuples) as a hashable tuple, validated.

    Each rule is (logical name, mesh axis | tuple of mesh axes | None).
    """
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ConfigError(f'logical_axis_rules[{i}] = {rule!r}: expected (logical name, '
                              'mesh axes)')
        name, mesh_axes = rule
        if name not in ax.ALL:
            raise ConfigError(f"logical_axis_rules[{i}]: unknown logical axis {name!r}; "
                              f'known: {ax.ALL}')
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
            names = mesh_axes
        else:
            names = () if mesh_axes is None else (mesh_axes,)
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise ConfigError(f'logical_axis_rules[{i}] ({name!r}): unknown mesh axes {bad}; '
                              f'mesh axes are {MESH_AXES}')
        out.append((str(name), mesh_axes))
    return tuple(out)


_WARNED_IDLE: set = set()


def rules_for_mesh(rules, mesh) -> Tuple[Tuple[str, Any], ...]:
    """`rules` restricted to the axes `mesh` really has (any order, any subset of
    `MESH_AXES`), so a user's own `Mesh(devices, ('data',))` works like the full mesh.

    A rule's mesh axes the mesh lacks are dropped (('batch', ('data', 'fsdp')) on a
    ('data',) mesh becomes ('batch', 'data')); a rule left with none is dropped, and a logical
    name that lost every rule is mapped to None at the end (replicated, as on a size-1 axis).
    Mesh axes named outside `MESH_AXES` are refused when larger than 1 (no rule could ever use
    them: the user meant them for something else, e.g. 'dp' for 'data'); size-1 ones are
    harmless and ignored. A known axis no rule uses (e.g. 'model' with rules that never name
    it) only replicates, which is logged. Idempotent.
    """
    rules = normalize_rules(rules)
    have = tuple(mesh.axis_names)
    unknown = {a: int(mesh.shape[a]) for a in have if a not in MESH_AXES and mesh.shape[a] > 1}
    if unknown:
        raise ConfigError(f'mesh axes {unknown} are not vd_jax mesh axes {MESH_AXES}: the '
                          "logical-axis rules place arrays only on those (name the axes e.g. "
                          "Mesh(devices, ('data',)) for data parallelism, ('fsdp',) to also "
                          "shard parameters, ('data', 'fsdp', 'model'))")
    out, lost = [], []
    for name, mesh_axes in rules:
        if mesh_axes is None:
            out.append((name, None))
            continue
        kept = tuple(a for a in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,))
                     if a in have)
        if kept:
            out.append((name, kept if len(kept) > 1 else kept[0]))
        elif name not in lost:
            lost.append(name)
    out += [(name, None) for name in lost if all(n != name for n, _ in out)]
    used = {a for _, m in out for a in (m if isinstance(m, tuple) else (m,)) if a}
    idle = [a for a in have if a in MESH_AXES and a not in used and mesh.shape[a] > 1]
    said = (tuple(mesh.shape.items()), tuple(idle))
    if idle and said not in _WARNED_IDLE:  # once per mesh, not per batch
        _WARNED_IDLE.add(said)
        logger.warning('mesh axes %s are used by no logical-axis rule: everything is '
                       'replicated along them', idle)
    return tuple(out)


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
    return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, where: str = '') -> P:
    """`spec` with every dimension its mesh axes do not divide set to None (replicated).

    jax requires even shards; a conv kernel with 4 input channels on an 8-way `fsdp` axis,
    say, is therefore replicated along that dimension instead (logged once per leaf).
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    changed = []
    for d, mesh_axes in enumerate(entries):
        n = _axis_size(mesh, mesh_axes)
        if n > 1 and shape[d] % n:
            changed.append(f'dim {d} (size {shape[d]}) over {mesh_axes} ({n})')
            entries[d] = None
    if changed:
        logger.info('replicating %s: %s not divisible', where or 'array', ', '.join(changed))
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (boxed) abstract values, e.g. `jax.eval_shape(model.init)`.

    Leaves boxed with `nn.LogicallyPartitioned` get their logical names resolved through
    `rules`; unboxed leaves are replicated. The result has the structure of the *unboxed*
    tree (what `nn.unbox` gives), so it can be an `out_shardings` of a jitted init.
    """
    rules = rules_for_mesh(rules, mesh)
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    values = nn.unbox(abstract_boxed)
    flat_v, treedef = jax.tree_util.tree_flatten_with_path(values)
    flat_s = treedef.flatten_up_to(shardings)
    fitted = [NamedSharding(mesh, fit_spec(s.spec, v.shape, mesh, path_str(p)))
              for (p, v), s in zip(flat_v, flat_s)]
    return jax.tree_util.tree_unflatten(treedef, fitted)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(rules, ndim: int = 1) -> P:
    """PartitionSpec of a batch array: its leading dimension is the logical 'batch' axis."""
    return nn.logical_to_mesh_axes((ax.BATCH,) + (None,) * (ndim - 1), normalize_rules(rules))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split (data x fsdp with the default rules)."""
    spec = batch_spec(rules_for_mesh(rules, mesh))
    return _axis_size(mesh, spec[0] if len(spec) else None)


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rules_for_mesh(rules, mesh), ndim))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules) -> Dict[str, jax.Array]:
    """Assemble this process's share of a batch into global arrays sharded on 'batch'.

    Every process calls this with its own `local` rows (same keys, shapes equal except the
    batch dimension, which is global_batch / process_count); `jax.make_array_from_process_local_data`
    places them on the process's devices without any cross-host transfer.
    """
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.dtype.kind in 'OUS':
            raise ConfigError(f"batch field '{k}' holds {v.dtype} values; only numeric arrays "
                              'go to devices (tokenize text on the host first)')
        sh = batch_sharding(mesh, rules, v.ndim)
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


def put_global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with `sharding`.

    Works with several processes (each device reads its own slice), unlike `device_put`.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def describe(mesh: Mesh) -> str:
    return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices "
            f"({jax.process_count()} process(es), {jax.local_device_count()} local)")


def parse_mesh(text: str) -> Dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4} (axes of `vd_jax.sharding.MESH_AXES`; one
    size may be -1: all remaining devices). ValueError naming the problem."""
    out: Dict[str, int] = {}
    for item in [x.strip() for x in str(text).split(',') if x.strip()]:
        axis, eq, size = item.partition('=')
        axis = axis.strip()
        if not eq or axis not in MESH_AXES:
            raise ValueError(f"mesh '{text}': expected AXIS=SIZE items with AXIS one of "
                             f'{MESH_AXES}, e.g. data=2,fsdp=4 (got {item!r})')
        try:
            out[axis] = int(size)
        except ValueError:
            raise ValueError(f"mesh '{text}': size of {axis} must be an integer (-1 = all "
                             f'remaining devices), got {size!r}') from None
        if out[axis] == 0 or out[axis] < -1:
            raise ValueError(f"mesh '{text}': {axis}={out[axis]} must be positive or -1")
    if not out:
        raise ValueError(f"mesh '{text}': empty; e.g. data=-1 or data=2,fsdp=4")
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"mesh '{text}': at most one axis may be -1")
    return out


def as_mesh(mesh, devices=None):
    """A `jax.sharding.Mesh` from a Mesh (returned as is), a mapping {axis: size} or a
    string 'data=2,fsdp=4' (axes data / fsdp / model, missing ones 1, one -1 = the remaining
    devices), over `devices` (default this process's, `jax.local_devices()`); None stays None."""
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        return mesh
    shape = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    return create_mesh(shape, jax.local_devices() if devices is None else devices)


def gather(tree) -> Any:
    """Global (possibly sharded, multi-process) arrays -> full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils  # noqa: PLC0415 -- lazy: multi-process only
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
