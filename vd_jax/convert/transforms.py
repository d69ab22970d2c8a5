"""Named tensor transforms between PyTorch layouts and vd_jax (channels-last) layouts.

Each transform maps a source tensor to the Flax leaf (`to_flax`), back (`to_torch`, used
by exports and round-trip tests), and predicts the source shape from the Flax shape so
that every shape is checked before any tensor data is read.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

Shape = Tuple[int, ...]


class Transform:
    name = 'transform'

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def source_shape(self, target: Shape) -> Shape:
        raise NotImplementedError

    def __repr__(self):
        return self.name


class _Identity(Transform):
    """Biases, norm weights (weight -> scale), embeddings, GPT-2 Conv1D (already (in, out))."""
    name = 'identity'

    def to_flax(self, a):
        return a

    def to_torch(self, a):
        return a

    def source_shape(self, target):
        return tuple(target)


class _Linear(Transform):
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    name = 'linear'

    def to_flax(self, a):
        return a.T

    def to_torch(self, a):
        return a.T

    def source_shape(self, target):
        return (target[1], target[0])


class _Conv(Transform):
    """nn.Conv2d weight OIHW -> HWIO."""
    name = 'conv'

    def to_flax(self, a):
        return a.transpose(2, 3, 1, 0)

    def to_torch(self, a):
        return a.transpose(3, 2, 0, 1)

    def source_shape(self, target):
        kh, kw, i, o = target
        return (o, i, kh, kw)


class _Conv1x1(Transform):
    """1x1 nn.Conv2d weight (out, in, 1, 1) -> Dense kernel (in, out)."""
    name = 'conv1x1'

    def to_flax(self, a):
        return a[:, :, 0, 0].T

    def to_torch(self, a):
        return a.T[:, :, None, None]

    def source_shape(self, target):
        return (target[1], target[0], 1, 1)


def _to_s_major(a: np.ndarray, axis: int, s: int) -> np.ndarray:
    """Reorder features along `axis` from channel-major (c*S + s) to position-major (s*C + c)."""
    if s == 1:
        return a
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    a = a.reshape((n // s, s) + a.shape[1:]).swapaxes(0, 1).reshape((n,) + a.shape[1:])
    return np.moveaxis(a, 0, axis)


def _to_c_major(a: np.ndarray, axis: int, s: int) -> np.ndarray:
    if s == 1:
        return a
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    a = a.reshape((s, n // s) + a.shape[1:]).swapaxes(0, 1).reshape((n,) + a.shape[1:])
    return np.moveaxis(a, 0, axis)


@dataclasses.dataclass(frozen=True, repr=False)
class FlatVector(Transform):
    """A vector over the flattened text state (C*S features): PyTorch keeps (B, C, S, 1)
    channel-major, vd_jax keeps (B, S, 1, C) position-major, so features are permuted."""
    s: int

    @property
    def name(self):
        return f'flat_vector(S={self.s})'

    def to_flax(self, a):
        return _to_s_major(a, 0, self.s)

    def to_torch(self, a):
        return _to_c_major(a, 0, self.s)

    def source_shape(self, target):
        return tuple(target)


@dataclasses.dataclass(frozen=True, repr=False)
class FlatDense(Transform):
    """A dense layer of the text stream: (out, in) Linear or (out, in, 1, 1) 1x1 conv weight
    over flattened (C, S) features -> (in, out) kernel over (S, C) features."""
    s_in: int
    s_out: int
    conv: bool = False

    @property
    def name(self):
        return f"flat_{'conv1x1' if self.conv else 'linear'}(S_in={self.s_in}, S_out={self.s_out})"

    def to_flax(self, a):
        if self.conv:
            a = a[:, :, 0, 0]
        return _to_s_major(_to_s_major(a.T, 0, self.s_in), 1, self.s_out)

    def to_torch(self, a):
        w = _to_c_major(_to_c_major(a, 0, self.s_in), 1, self.s_out).T
        return w[:, :, None, None] if self.conv else w

    def source_shape(self, target):
        return (target[1], target[0]) + ((1, 1) if self.conv else ())


IDENTITY = _Identity()
LINEAR = _Linear()
CONV = _Conv()
CONV1X1 = _Conv1x1()
