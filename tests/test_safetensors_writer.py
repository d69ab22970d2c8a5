"""vd_jax.checkpoint.SafetensorsWriter / load_safetensors against the `safetensors` package
(the reference reader and writer): every dtype we store, 0-d tensors (CLIP's `logit_scale` is
one in the released checkpoints), empty tensors, Fortran-ordered input, header metadata."""
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vd_jax.checkpoint import SafetensorsWriter, load_safetensors
from vd_jax.errors import CheckpointError


def _tensors():
    rng = np.random.default_rng(0)
    return {
        'logit_scale': np.asarray(4.6052, np.float32),  # 0-d
        'w16': rng.standard_normal((3, 5)).astype(np.float16),
        'w32_fortran': np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        'ids': np.arange(7, dtype=np.int64),
        'empty': np.zeros((0, 3), np.float32),
    }


def test_writer_output_reads_back_with_the_reference(tmp_path):
    t = _tensors()
    path = str(tmp_path / 'a.safetensors')
    w = SafetensorsWriter(path, [(k, v.shape, v.dtype) for k, v in t.items()], {'format': 'np'})
    for k, v in t.items():
        w.write(k, v)
    w.close()
    ref = load_file(path)
    assert set(ref) == set(t)
    for k, v in t.items():
        assert ref[k].shape == v.shape and ref[k].dtype == v.dtype, k
        np.testing.assert_array_equal(ref[k], v, err_msg=k)


def test_reader_reads_the_references_files(tmp_path):
    t = _tensors()
    path = str(tmp_path / 'b.safetensors')
    save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in t.items()}, path)
    got = load_safetensors(path)
    for k, v in t.items():
        a = np.asarray(got[k])
        assert a.shape == v.shape and a.dtype == v.dtype, k
        np.testing.assert_array_equal(a, v, err_msg=k)


def test_writer_refuses_a_wrong_shape_by_name(tmp_path):
    w = SafetensorsWriter(str(tmp_path / 'c.safetensors'), [('x', (), np.float32)])
    with pytest.raises(CheckpointError, match=r"tensor 'x': shape \(1,\), declared \(\)"):
        w.write('x', np.zeros((1,), np.float32))
