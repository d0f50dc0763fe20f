"""DLPack in both directions: producers read without a copy (every dtype,
bfloat16 included; strides and read-only honoured; CPU only), and results
handed to PyTorch and JAX without a copy (`fusedce.to_dlpack`)."""

from __future__ import annotations

import gc
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedce
from fusedce._arrays import as_array

RNG = np.random.default_rng(7)


class Producer:
    """A minimal DLPack producer over another producer (or a fake device)."""

    def __init__(self, inner, device=(1, 0)):
        self.inner, self.device = inner, device

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, **kw):
        return self.inner.__dlpack__(**kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.bool_])
def test_round_trip_through_our_own_export_shares_memory(dtype):
    a = (RNG.normal(size=(3, 5)) * 3).astype(dtype)
    b = as_array("input", Producer(fusedce.to_dlpack(a)))
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np.shares_memory(a, b)
    np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))


def test_strided_and_read_only_producers_are_honoured():
    base = RNG.normal(size=(6, 8)).astype(np.float32)
    view = base[::2, 1::3]
    b = as_array("input", fusedce.to_dlpack(view))
    assert b.strides == view.strides and np.shares_memory(b, base)
    np.testing.assert_array_equal(b, view)
    frozen = base.copy()
    frozen.flags.writeable = False
    b = as_array("input", fusedce.to_dlpack(frozen))
    assert not b.flags.writeable
    t = np.arange(6) % 8
    with pytest.raises(ValueError, match="grad_out"):
        fusedce.cross_entropy(base, t, return_grad=True, grad_out=fusedce.to_dlpack(frozen))


def test_non_cpu_and_unknown_dtypes_are_refused_by_name():
    with pytest.raises(TypeError, match="input: a DLPack tensor on device type 2"):
        fusedce.cross_entropy(Producer(fusedce.to_dlpack(np.ones((2, 3), np.float32)), (2, 0)), np.zeros(2, int))
    with pytest.raises(TypeError, match="array: dtype complex64"):
        fusedce.to_dlpack(np.ones(3, np.complex64))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_layout_round_trips(data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8]))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    base = (np.arange(int(np.prod(shape, dtype=np.int64))) % 7).astype(dtype).reshape(shape)
    index = tuple(slice(None, None, data.draw(st.sampled_from([1, 2, -1, -2]))) for _ in shape)
    view = base[index] if shape else base
    got = as_array("input", fusedce.to_dlpack(view))
    assert got.shape == view.shape and got.dtype == view.dtype
    np.testing.assert_array_equal(got.astype(np.float64), view.astype(np.float64))
    if view.size:
        assert np.shares_memory(got, base)


def test_an_unconsumed_capsule_releases_the_array():
    a = np.ones((4, 4), np.float32)
    before = sys.getrefcount(a)
    e = fusedce.to_dlpack(a)
    for _ in range(10):
        e.__dlpack__()
        e.__dlpack__(max_version=(1, 0))
    del e
    gc.collect()
    assert sys.getrefcount(a) == before


def test_a_view_outlives_its_producer():
    a = RNG.normal(size=(50, 7)).astype(np.float32)
    want = a.copy()
    b = as_array("input", fusedce.to_dlpack(a))
    del a
    gc.collect()
    np.testing.assert_array_equal(b, want)


class TestTorch:
    @pytest.fixture(autouse=True)
    def _torch(self):
        from optional import need

        self.torch = need("torch")

    @pytest.mark.parametrize("name", ["float32", "float64", "float16", "bfloat16"])
    def test_every_float_dtype_reads_without_a_copy_and_matches_numpy(self, name):
        torch = self.torch
        x = torch.randn(33, 70).to(getattr(torch, name))
        t = torch.randint(0, 70, (33,))
        a = as_array("input", x)
        assert a.__array_interface__["data"][0] == x.data_ptr()
        same = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if name == "bfloat16" else x.numpy()
        want = fusedce.cross_entropy(same, t.numpy(), reduction="none")
        got = fusedce.cross_entropy(x, t, reduction="none")
        np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))

    def test_a_bfloat16_gradient_is_written_into_a_torch_tensor(self):
        torch = self.torch
        x = torch.randn(16, 40).to(torch.bfloat16)
        t = torch.randint(0, 40, (16,))
        grad = torch.empty_like(x)
        _, g = fusedce.cross_entropy(x, t, return_grad=True, grad_out=grad)
        assert g.__array_interface__["data"][0] == grad.data_ptr()
        xr = x.float().requires_grad_()
        torch.nn.functional.cross_entropy(xr, t).backward()
        torch.testing.assert_close(grad.float(), xr.grad, atol=1e-2, rtol=2e-2)

    def test_a_tensor_that_requires_grad_is_a_type_error_naming_the_argument(self):
        x = self.torch.randn(3, 4, requires_grad=True)
        with pytest.raises(TypeError, match="input: could not be read through DLPack"):
            fusedce.cross_entropy(x, np.zeros(3, int))

    def test_non_contiguous_tensors(self):
        torch = self.torch
        x = torch.randn(40, 90)[::3, 5:]
        t = torch.randint(0, 85, (14,))
        np.testing.assert_array_equal(
            fusedce.cross_entropy(x, t, reduction="none"),
            fusedce.cross_entropy(np.ascontiguousarray(x.numpy()), t.numpy(), reduction="none"),
        )

    def test_results_cross_back_without_a_copy(self):
        torch = self.torch
        x = np.random.randn(8, 30).astype(ml_dtypes.bfloat16)
        _, g = fusedce.cross_entropy(x, np.arange(8), return_grad=True)
        tg = torch.from_dlpack(fusedce.to_dlpack(g))
        assert tg.dtype == torch.bfloat16 and tg.data_ptr() == g.__array_interface__["data"][0]
        f32 = np.random.randn(4).astype(np.float32)
        assert torch.from_dlpack(f32).data_ptr() == f32.__array_interface__["data"][0]


def test_jax_arrays_are_read_only_and_cross_both_ways():
    from optional import need

    jax = need("jax")
    jnp = jax.numpy
    x = jnp.asarray(RNG.normal(size=(6, 9)), jnp.bfloat16)
    a = as_array("input", x)
    assert a.dtype == ml_dtypes.bfloat16 and not a.flags.writeable
    with pytest.raises(ValueError, match="grad_out: expected a writeable array"):
        fusedce.cross_entropy(x, np.arange(6), return_grad=True, grad_out=x)
    _, g = fusedce.cross_entropy(x, np.arange(6), return_grad=True)
    back = jax.dlpack.from_dlpack(fusedce.to_dlpack(g))
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back), g)
