"""The Python <-> C boundary: DLPack consumption, argument checks, errors.

Fake producers are built with ctypes so the tests can hand the extension
capsules that no real framework would make on a CPU-only machine (a CUDA
device, an unknown major version, NULL strides, odd dtypes) and can count
deleter calls: whoever takes a capsule must call its deleter exactly once,
on success and on every error path.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import kvcompress
from kvcompress import _C, ops
from kvcompress.errors import KVCompressError, KVCompressTypeError, KVCompressValueError

# ----------------------------------------------------------------- ctypes DLPack


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_NP_CODES = {"f": 2, "i": 0, "u": 1, "b": 6, "c": 5}


class FakeProducer:
    """Exports a NumPy array through a hand-made capsule (no capsule
    destructor: only a consumer that takes ownership calls the deleter)."""

    def __init__(self, array, *, device_type=1, dtype=None, versioned=True, major=1, read_only=False,
                 null_strides=False):
        self.array = array
        self.device_type = device_type
        self.dtype = dtype  # (code, bits, lanes) override
        self.versioned = versioned
        self.major = major
        self.read_only = read_only
        self.null_strides = null_strides
        self.exported = 0
        self.deleted = 0
        self._keep = []
        self._deleter = DELETER(self._on_delete)

    def _on_delete(self, _ptr):
        self.deleted += 1

    def _capsule(self):
        a = self.array
        shape = (ctypes.c_int64 * max(a.ndim, 1))(*a.shape)
        strides = (ctypes.c_int64 * max(a.ndim, 1))(*(s // a.itemsize for s in a.strides))
        code, bits, lanes = self.dtype or (_NP_CODES[a.dtype.kind], a.itemsize * 8, 1)
        t = DLTensor(
            data=a.ctypes.data,
            device=DLDevice(self.device_type, 0),
            ndim=a.ndim,
            dtype=DLDataType(code, bits, lanes),
            shape=shape,
            strides=None if self.null_strides else strides,
            byte_offset=0,
        )
        if self.versioned:
            m = DLManagedTensorVersioned(
                version=DLPackVersion(self.major, 1), manager_ctx=None, deleter=self._deleter,
                flags=1 if self.read_only else 0, dl_tensor=t,
            )
            name = b"dltensor_versioned"
        else:
            m = DLManagedTensor(dl_tensor=t, manager_ctx=None, deleter=self._deleter)
            name = b"dltensor"
        self._keep.append((shape, strides, m, name))
        self.exported += 1
        return _capsule_new(ctypes.addressof(m), name, None)

    def __dlpack__(self, max_version=None, stream=None, dl_device=None, copy=None):
        if not self.versioned:
            raise TypeError("legacy producer: no max_version")  # consumer must retry
        return self._capsule()

    def __dlpack_device__(self):
        return (self.device_type, 0)


class LegacyFake(FakeProducer):
    def __dlpack__(self):  # no keyword arguments at all, like pre-2023 producers
        return self._capsule()


class LegacyTorch:
    """A producer that only knows legacy capsules, backed by a torch tensor."""

    def __init__(self, t):
        self.t = t
        self.shape = tuple(t.shape)

    def __dlpack__(self):
        return self.t.__dlpack__()


def rand(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------- capsules


def test_exception_hierarchy():
    assert issubclass(KVCompressValueError, KVCompressError) and issubclass(KVCompressValueError, ValueError)
    assert issubclass(KVCompressTypeError, KVCompressError) and issubclass(KVCompressTypeError, TypeError)
    assert issubclass(KVCompressError, Exception)
    assert KVCompressError.__module__ == "kvcompress"
    assert _C.KVCompressError is kvcompress.KVCompressError is KVCompressError


@pytest.mark.parametrize("versioned", [True, False])
@pytest.mark.parametrize("null_strides", [False, True])
def test_fake_capsules_are_consumed_and_deleted(versioned, null_strides):
    x = rand(2, 3, 5, 8)
    cls = FakeProducer if versioned else LegacyFake
    fake = cls(x, versioned=versioned, null_strides=null_strides)
    got = ops.vector_norm(fake)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, np.linalg.norm(x, axis=-1), rtol=1e-6)
    assert fake.exported >= 1 and fake.deleted == fake.exported


def test_fake_strided_capsule():
    base = rand(2, 8, 3, 10)
    x = base.transpose(0, 2, 1, 3)[:, :, ::2, ::3]  # non-contiguous, odd strides
    fake = FakeProducer(x)
    np.testing.assert_allclose(ops.vector_norm(fake, ord=1), np.abs(x).sum(-1), rtol=1e-5)
    assert fake.deleted == fake.exported


def test_legacy_torch_capsule():
    t = torch.randn(2, 3, 6, 8)
    got = ops.vector_norm(LegacyTorch(t))
    torch.testing.assert_close(torch.from_numpy(got), t.norm(dim=-1))
    q = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(
        torch.from_numpy(ops.window_scores(LegacyTorch(q), LegacyTorch(q))), ops.window_scores(q, q)
    )


@pytest.mark.skipif(_C.has_cuda, reason="a CUDA build accepts CUDA capsules (tests/test_cuda.py covers them)")
def test_fake_cuda_device_rejected_and_deleted():
    fake = FakeProducer(rand(1, 2, 3, 4), device_type=2)
    with pytest.raises(KVCompressValueError, match=r"x: CUDA tensors need a CUDA build of kvcompress \(KVCOMPRESS_CUDA=1\)"):
        ops.vector_norm(fake)
    assert fake.deleted == fake.exported >= 1
    other = FakeProducer(rand(1, 2, 3, 4), device_type=4)  # OpenCL
    with pytest.raises(KVCompressValueError, match="x: tensors on DLPack device type 4"):
        ops.vector_norm(other)


def test_unknown_major_version_rejected_and_deleted():
    fake = FakeProducer(rand(1, 2, 3, 4), major=2)
    with pytest.raises(KVCompressValueError, match="x: DLPack major version 2 is not supported"):
        ops.vector_norm(fake)
    assert fake.deleted == fake.exported >= 1


def test_unsupported_fake_dtypes():
    x = rand(1, 2, 3, 4)
    with pytest.raises(KVCompressTypeError, match=r"x: expected dtype .* got DLPack dtype \(code 2, 32 bits, 4 lanes\)"):
        ops.vector_norm(FakeProducer(x, dtype=(2, 32, 4)))
    with pytest.raises(KVCompressTypeError, match="got float8"):
        ops.vector_norm(FakeProducer(x.view(np.uint8)[..., :4], dtype=(2, 8, 1)))


def test_deleters_called_on_later_errors():
    q = FakeProducer(rand(1, 2, 3, 8))
    k = FakeProducer(rand(1, 2, 5, 4))  # wrong head dim
    with pytest.raises(KVCompressValueError, match="keys: head dim 4 does not match queries"):
        ops.window_scores(q, k)
    assert q.deleted == q.exported >= 1 and k.deleted == k.exported >= 1


def test_read_only_fake_output_rejected():
    k = rand(1, 2, 5, 4)
    idx = np.zeros((1, 2, 3), dtype=np.int64)
    out = FakeProducer(np.zeros((1, 2, 3, 4), np.float32), read_only=True)
    with pytest.raises(KVCompressValueError, match="out_keys: output is read-only"):
        ops.gather(k, k, idx, out_keys=out, out_values=np.zeros((1, 2, 3, 4), np.float32))
    assert out.deleted == out.exported


def test_numpy_read_only_inputs_accepted_and_untouched():
    q = rand(1, 4, 3, 8)
    k = rand(1, 2, 9, 8, seed=1)
    idx = np.array([[[0, 4, 8], [1, 2, 3]]], dtype=np.int32)
    copies = [a.copy() for a in (q, k, idx)]
    for a in (q, k, idx):
        a.flags.writeable = False
    ops.window_scores(q, k)
    ops.vector_norm(k)
    ops.gather(k, k, idx)
    ops.select_topk(np.ascontiguousarray(ops.window_scores(q, k)), 3)
    for a, c in zip((q, k, idx), copies):
        assert np.array_equal(a, c)


def test_numpy_read_only_output_rejected():
    k = rand(1, 2, 5, 4)
    out = np.zeros((1, 2, 3, 4), np.float32)
    out.flags.writeable = False
    with pytest.raises(KVCompressValueError, match="out_keys: output is read-only"):
        ops.gather(k, k, np.zeros((1, 2, 3), np.int64), out_keys=out)


def test_requires_grad_tensors_accepted():
    k = torch.randn(1, 2, 5, 8, requires_grad=True)
    torch.testing.assert_close(ops.vector_norm(k), k.detach().norm(dim=-1))


# ----------------------------------------------------------------- argument checks


def test_bad_dtypes_are_type_errors():
    k64 = rand(1, 2, 5, 8).astype(np.float64)
    with pytest.raises(KVCompressTypeError, match="keys: expected dtype float32, float16 or bfloat16, got float64"):
        ops.window_scores(rand(1, 2, 3, 8), k64)
    with pytest.raises(KVCompressTypeError, match="got int8"):
        ops.vector_norm(np.zeros((1, 2, 3, 4), np.int8))
    with pytest.raises(KVCompressTypeError, match="keys: dtype float16 does not match queries dtype float32"):
        ops.window_scores(rand(1, 2, 3, 8), rand(1, 2, 5, 8).astype(np.float16))
    with pytest.raises(KVCompressTypeError, match="values: dtype float16 does not match keys dtype float32"):
        ops.gather(rand(1, 2, 5, 8), rand(1, 2, 5, 8).astype(np.float16), np.zeros((1, 2, 1), np.int64))
    with pytest.raises(KVCompressTypeError, match="indices: expected dtype int32 or int64, got float32"):
        ops.gather(rand(1, 2, 5, 8), rand(1, 2, 5, 8), np.zeros((1, 2, 1), np.float32))
    with pytest.raises(KVCompressTypeError, match="scores: expected dtype float32, got float16"):
        ops.select_topk(torch.zeros(1, 2, 5, dtype=torch.float16), 2)
    with pytest.raises(KVCompressTypeError, match="queries: expected a tensor or array supporting DLPack"):
        ops.window_scores("not a tensor", rand(1, 2, 5, 8))
    with pytest.raises(KVCompressTypeError, match="kv_start: expected dtype int64, got float32"):
        ops.window_scores(rand(1, 2, 3, 8), rand(1, 2, 5, 8), kv_start=np.zeros(1, np.float32))


def test_wrong_rank_and_shapes_are_value_errors():
    q, k = rand(2, 6, 3, 8), rand(2, 2, 5, 8)
    with pytest.raises(KVCompressValueError, match=r"keys: expected a 4-D tensor \[B, Hkv, Tk, D\], got 3-D"):
        ops.window_scores(q, k[0])
    with pytest.raises(KVCompressValueError, match="keys: batch size 1 does not match queries \\(2\\)"):
        ops.window_scores(q, k[:1])
    with pytest.raises(KVCompressValueError, match="queries: 6 heads is not a positive multiple of the 4 kv heads"):
        ops.window_scores(q, rand(2, 4, 5, 8))
    with pytest.raises(KVCompressValueError, match="queries: 0 heads is not a positive multiple of the 2 kv heads"):
        ops.window_scores(rand(2, 0, 3, 8), k)
    with pytest.raises(KVCompressValueError, match="keys: head dim 16 does not match queries \\(8\\)"):
        ops.window_scores(q, rand(2, 2, 5, 16))
    with pytest.raises(KVCompressValueError, match="queries: 3 queries but only 2 keys"):
        ops.window_scores(q, rand(2, 2, 2, 8))
    with pytest.raises(KVCompressValueError, match=r"kv_start: expected shape \[B\] = \[2\], got \[3\]"):
        ops.window_scores(q, k, kv_start=np.zeros(3, np.int64))
    with pytest.raises(KVCompressValueError, match="kv_start: expected a 1-D tensor"):
        ops.window_scores(q, k, kv_start=np.zeros((2, 1), np.int64))
    with pytest.raises(KVCompressValueError, match=r"kv_start: value 6 at batch 1 is outside \[0, 5\]"):
        ops.window_scores(q, k, kv_start=[0, 6])
    with pytest.raises(KVCompressValueError, match="gqa: expected 'mean' or 'max'"):
        ops.window_scores(q, k, gqa="sum")
    with pytest.raises(KVCompressValueError, match="scaling: must be finite"):
        ops.window_scores(q, k, scaling=float("nan"))
    with pytest.raises(KVCompressValueError, match=r"x: expected a 4-D tensor \[B, H, T, D\], got 2-D"):
        ops.vector_norm(rand(3, 4))
    with pytest.raises(KVCompressValueError, match="ord: expected 1 or 2"):
        ops.vector_norm(k, ord=3)
    with pytest.raises(KVCompressValueError, match="kernel: expected an odd size >= 1, got 4"):
        ops.pool1d(rand(1, 2, 5), 4)
    with pytest.raises(KVCompressValueError, match="mode: expected 'max' or 'avg'"):
        ops.pool1d(rand(1, 2, 5), 3, mode="min")
    with pytest.raises(KVCompressValueError, match=r"indices: expected shape \[B, H, n\] = \[2, 2, 3\], got \[1, 2, 3\]"):
        ops.gather(k, k, np.zeros((1, 2, 3), np.int64))
    with pytest.raises(KVCompressValueError, match=r"values: expected shape \[B, H, T, Dv\] = \[2, 2, 5, 8\], got \[2, 2, 4, 8\]"):
        ops.gather(k, rand(2, 2, 4, 8), np.zeros((2, 2, 3), np.int64))


def test_select_topk_errors():
    s = rand(2, 3, 10)
    with pytest.raises(KVCompressValueError, match=r"k: 0 is outside \[1, T\] = \[1, 10\]"):
        ops.select_topk(s, 0)
    with pytest.raises(KVCompressValueError, match=r"k: -3 is outside"):
        ops.select_topk(s, -3)
    with pytest.raises(KVCompressValueError, match=r"k: 11 is outside \[1, T\] = \[1, 10\]"):
        ops.select_topk(s, 11)
    k = np.full((2, 3), 4)
    k[1, 2] = 0
    with pytest.raises(KVCompressValueError, match=r"k: 0 at \(b=1, h=2\) is outside"):
        ops.select_topk(s, k)
    with pytest.raises(KVCompressValueError, match=r"k: 4 at \(b=0, h=0\) is smaller than the 5 forced keeps"):
        ops.select_topk(s, 4, sinks=2, window=3)
    with pytest.raises(KVCompressValueError, match=r"k: expected shape \[B, H\] = \[2, 3\], got \[3, 2\]"):
        ops.select_topk(s, np.full((3, 2), 2))
    with pytest.raises(KVCompressValueError, match="sinks: must be >= 0"):
        ops.select_topk(s, 2, sinks=-1)
    with pytest.raises(KVCompressTypeError, match="k: expected an int or an integer tensor"):
        ops.select_topk(s, True)
    bad = s.copy()
    bad[1, 2, 7] = np.nan
    with pytest.raises(KVCompressValueError, match="scores: contains NaN"):
        ops.select_topk(bad, 3)
    with pytest.raises(KVCompressValueError, match="scores: contains NaN"):
        ops.select_topk(torch.from_numpy(bad), 10)


def test_gather_index_and_aliasing_errors():
    k, v = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=3)
    with pytest.raises(KVCompressValueError, match=r"indices: value 5 at \[0, 1, 2\] is outside \[0, T\) = \[0, 5\)"):
        ops.gather(k, v, np.array([[[0, 1, 2], [0, 1, 5]]]))
    with pytest.raises(KVCompressValueError, match="indices: value -1 at"):
        ops.gather(k, v, np.array([[[0, -1, 2], [0, 1, 4]]]))
    idx = np.array([[[0, 1, 2, 3, 4]] * 2])
    with pytest.raises(KVCompressValueError, match="out_keys: output must not overlap keys"):
        ops.gather(k, v, idx, out_keys=k)
    with pytest.raises(KVCompressValueError, match="out_values: output must not overlap keys"):
        ops.gather(k, v, idx, out_values=k)
    with pytest.raises(KVCompressValueError, match="out_keys: output must not overlap out_values"):
        o = np.zeros((1, 2, 5, 4), np.float32)
        ops.gather(k, v, idx, out_keys=o, out_values=o)
    with pytest.raises(KVCompressValueError, match="out_keys: output has overlapping elements"):
        ops.gather(torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(idx),
                   out_keys=torch.zeros(1, 1, 5, 4).expand(1, 2, 5, 4))
    with pytest.raises(KVCompressTypeError, match="out_keys: dtype float16 does not match keys dtype float32"):
        ops.gather(k, v, idx, out_keys=np.zeros((1, 2, 5, 4), np.float16))
    with pytest.raises(KVCompressValueError, match=r"out_keys: expected shape \[B, H, n, D\] = \[1, 2, 5, 4\]"):
        ops.gather(k, v, idx, out_keys=np.zeros((1, 2, 4, 4), np.float32))


def test_low_level_output_checks():
    q = rand(1, 2, 3, 8)
    with pytest.raises(KVCompressValueError, match="out: output must not overlap queries"):
        _C.window_scores(q, q, q.reshape(1, 2, 24)[..., :3], 1.0, False, None)
    with pytest.raises(KVCompressValueError, match=r"out: expected shape \[B, Hkv, Tk\]"):
        _C.window_scores(q, q, np.zeros((1, 2, 4), np.float32), 1.0, False, None)
    with pytest.raises(KVCompressTypeError, match="out: expected dtype float32, got float16"):
        _C.vector_norm(q, np.zeros((1, 2, 3), np.float16), 2)
    with pytest.raises(TypeError, match="takes 3 positional arguments"):
        _C.vector_norm(q)


class _Raises:
    shape = (1, 2, 3, 4)

    def __dlpack__(self, **kw):
        raise RuntimeError("producer exploded")


class _NotCapsule:
    shape = (1, 2, 3, 4)

    def __dlpack__(self, **kw):
        return 42


def test_misbehaving_producers():
    with pytest.raises(KVCompressValueError, match="x: __dlpack__\\(\\) of _Raises failed") as info:
        ops.vector_norm(_Raises())
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(KVCompressTypeError, match="x: __dlpack__\\(\\) returned int, not an unused DLPack capsule"):
        ops.vector_norm(_NotCapsule())
    t = torch.randn(1, 2, 3, 4)
    cap = t.__dlpack__()
    holder = type("Holder", (), {"shape": (1, 2, 3, 4), "__dlpack__": lambda self, **kw: cap})()
    ops.vector_norm(holder)  # first use consumes the capsule ...
    with pytest.raises(KVCompressTypeError, match="not an unused DLPack capsule"):
        ops.vector_norm(holder)  # ... a used one is refused


# ----------------------------------------------------------------- conversions


def test_fp16_bf16_conversions_match_numpy_and_torch():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.empty(65536, np.float32)
    _C._cast(halves, out)
    ref = halves.astype(np.float32)
    assert np.array_equal(out.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(out[np.isnan(ref)]).all()

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                        2.0**-14, 2.0**-14 * (1 - 2.0**-11), np.inf, -np.inf, 1.0 + 2.0**-11,
                        1.0 + 3 * 2.0**-11], np.float32)
    f = np.concatenate([bits.view(np.float32), special, -special])
    h = np.empty(f.size, np.float16)
    _C._cast(f, h)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the point
        ref = f.astype(np.float16)
    ok = ~np.isnan(ref)
    assert np.array_equal(h.view(np.uint16)[ok], ref.view(np.uint16)[ok])
    assert np.isnan(h[~ok]).all()

    tf = torch.from_numpy(f)
    bf = torch.empty(f.size, dtype=torch.bfloat16)
    _C._cast(tf, bf)
    tref = tf.to(torch.bfloat16)
    ok = ~torch.isnan(tref)
    assert torch.equal(bf.view(torch.int16)[ok], tref.view(torch.int16)[ok])
    assert torch.isnan(bf[~ok]).all()
    back = torch.empty(f.size)
    _C._cast(tref, back)
    assert torch.equal(back[ok], tref.float()[ok])


# ----------------------------------------------------------------- fuzz (subprocess)

FUZZ = r"""
import random, sys
import numpy as np, torch
from kvcompress import ops
from kvcompress.errors import KVCompressError

rng = random.Random(int(sys.argv[1]))
DT = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64, torch.bool]

def tensor():
    r = rng.random()
    if r < 0.08:
        return rng.choice([None, 1, 2.5, "x", [1, 2], object(), b"ab", {}])
    nd = rng.choice([0, 1, 2, 3, 3, 4, 4, 4, 5])
    shape = [rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(nd)]
    dt = rng.choice(DT)
    t = (torch.randn(shape) * 4).to(dt)
    if nd >= 2 and rng.random() < 0.4:
        t = t.transpose(0, nd - 1)
    if nd >= 1 and rng.random() < 0.3 and t.shape[-1] > 1:
        t = t[..., ::2]
    if nd >= 1 and rng.random() < 0.2:
        t = t.unsqueeze(0).expand(2, *t.shape)[0]
    if rng.random() < 0.3 and dt not in (torch.bfloat16,):
        return t.numpy()
    return t

def anyint():
    return rng.choice([-5, -1, 0, 1, 2, 3, 7, 2**40, tensor()])

calls = [
    lambda: ops.window_scores(tensor(), tensor(), kv_start=rng.choice([None, tensor(), [0, 1], [-1]]),
                              gqa=rng.choice(["mean", "max", "x"]), scaling=rng.choice([None, 0.5, float("inf")])),
    lambda: ops.vector_norm(tensor(), ord=rng.choice([1, 2, 3, 0])),
    lambda: ops.pool1d(tensor(), rng.choice([1, 3, 4, -1, 9]), mode=rng.choice(["max", "avg", "?"])),
    lambda: ops.lagkv_scores(tensor(), tensor(), lag=anyint(), sinks=rng.choice([0, 1, 4, -1]),
                             kv_start=rng.choice([None, tensor(), [0, 0], [9, 9]]), per_chunk=rng.random() < 0.5),
    lambda: ops.select_topk(tensor(), anyint(), sinks=rng.choice([0, 1, 3, -2]), window=rng.choice([0, 2, 9]),
                            kv_start=rng.choice([None, tensor(), [0, 0], [9, 9]])),
    lambda: ops.gather(tensor(), tensor(), tensor(), out_keys=rng.choice([None, None, tensor()]),
                       out_values=rng.choice([None, None, tensor()])),
    lambda: ops.kvcrush_pick(tensor(), tensor(), rng.choice([0, 1, 3, -1]),
                             anchor=rng.choice(["alternate", "random", "mean", "x"]), seed=rng.choice([0, 5, -1]),
                             kv_start=rng.choice([None, tensor(), [0, 0], [9, 9]])),
    lambda: ops.kvmerger_sets(tensor(), threshold=rng.choice([0.5, -2.0, float("nan"), "x"]),
                              sinks=rng.choice([0, 1, -1]), window=rng.choice([0, 2, -3]),
                              kv_start=rng.choice([None, tensor(), [0, 0], [9, 9]])),
    lambda: ops.gauss_merge(tensor(), tensor(), tensor(), tensor(), tensor(), sigma=rng.choice([1.0, 0.0, -1.0, "s"]),
                            counts=rng.choice([None, tensor()]), kv_start=rng.choice([None, tensor(), [0, 0]]),
                            return_assign=rng.random() < 0.5),
    lambda: ops.actqkv_scores(tensor(), tensor(), kv_start=rng.choice([None, tensor(), [0, 1], [-1]]),
                              scaling=rng.choice([None, 0.5, float("inf")]), return_weights=rng.random() < 0.5),
    lambda: ops.pooled_counts(tensor(), anyint()),
    lambda: ops.row_cosine(tensor(), tensor()),
    lambda: ops.fastgen_recovery(tensor(), tensor(), tensor(), rng.choice([0, 1, 5, 16, 17, -1]),
                                 kv_start=rng.choice([None, tensor(), [0, 0], [9, 9]])),
]
ok = bad = 0
for i in range(4000):
    try:
        rng.choice(calls)()
        ok += 1
    except KVCompressError:
        bad += 1
print("FUZZ-OK", ok, bad)
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_bad_inputs_in_subprocess(seed):
    proc = subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(FUZZ), str(seed)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "FUZZ-OK" in proc.stdout


def test_exchange_api_fast_path_matches_dlpack_path():
    # torch publishes a DLPack C exchange table; the extension uses it instead
    # of calling Tensor.__dlpack__ and must give identical results either way
    q = torch.randn(2, 6, 5, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 9, 16, dtype=torch.bfloat16)
    idx = torch.tensor([[[0, 8], [3, 4]], [[1, 1], [7, 2]]])
    results = []
    for flag in (True, False):
        prev = _C._use_exchange_api(flag)
        try:
            results.append((ops.window_scores(q, k, kv_start=torch.tensor([0, 2])), *ops.gather(k, k, idx)))
            with pytest.raises(KVCompressValueError, match="keys: head dim 8 does not match"):
                ops.window_scores(q, k[..., :8])
        finally:
            _C._use_exchange_api(prev)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [True, False], ids=["exchange", "dlpack"])
def test_views_the_c_side_cannot_see_through(fast):
    """DLPack hands over a tensor's memory, not torch's lazy negative bit
    (``x.conj().imag``) or autograd's view of it: inputs with the bit are
    read as the values they show, outputs with it or that require grad are
    refused by name (else written negated, or behind autograd's back)."""
    torch.manual_seed(0)
    z = torch.randn(1, 1, 8, 16, dtype=torch.complex64)
    shown = z.conj().imag
    assert shown.is_neg()
    prev = _C._use_exchange_api(fast)
    try:
        for a, b in zip(ops.pack_keys(shown, 8, 4), ops.pack_keys(shown.clone(), 8, 4)):
            assert torch.equal(a, b)
        packed = ops.pack_keys(torch.randn(1, 1, 8, 16), 4, 4)
        neg_out = torch.zeros(1, 1, 8, 16, dtype=torch.complex64).conj().imag
        with pytest.raises(KVCompressValueError, match="out: a view with torch's negative bit"):
            ops.unpack_keys(*packed, 4, 4, out=neg_out)
        with pytest.raises(KVCompressValueError, match="out: requires grad"):
            ops.unpack_keys(*packed, 4, 4, out=torch.zeros(1, 1, 8, 16, requires_grad=True))
        with pytest.raises(KVCompressValueError, match="scales: a view with torch's negative bit"):
            ops.pack_keys(torch.randn(1, 1, 8, 16), 4, 4,
                          scales=torch.zeros(1, 1, 2, 16, dtype=torch.complex64).conj().imag)
    finally:
        _C._use_exchange_api(prev)


def test_scaling_must_be_finite_as_float32():
    """The ops take ``scaling`` as fp32: a double past FLT_MAX is refused, not
    turned into inf (which gave NaN outputs)."""
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    pk, pv = ops.pack_keys(k, 4, 4), ops.pack_values(k, 4, 4)
    for call in (lambda s: ops.attention(q, k, k, scaling=s),
                 lambda s: ops.packed_attention(q, *pk, *pv, k[:, :, :1], k[:, :, :1], bits=4, group=4, scaling=s)):
        with pytest.raises(KVCompressValueError, match=r"scaling: must be finite \(in float32\), got 1e\+39"):
            call(1e39)
        call(3.0e38)  # finite as a float32: accepted


def test_packed_attention_refuses_an_empty_head_with_lse():
    """With D = 0 the kernels see an empty problem and would leave ``lse``
    unwritten: refused by name instead of returning uninitialised memory."""
    B, H, n, r, G = 2, 2, 9, 3, 2
    pk, pv = ops.pack_keys(torch.zeros(B, H, n, 0), 4, G), ops.pack_values(torch.zeros(B, H, n, 0), 4, G)
    q, res = torch.zeros(B, 4, 3, 0), torch.zeros(B, H, r, 0)
    with pytest.raises(KVCompressValueError, match="queries: head dim 0 with lse requested"):
        ops.packed_attention(q, *pk, *pv, res, res, bits=4, group=G, return_lse=True)
    assert ops.packed_attention(q, *pk, *pv, res, res, bits=4, group=G).shape == (B, 3, 4, 0)


def test_row_bytes_of_a_huge_head_do_not_wrap():
    """ceil(D * bits / 8) for D near 2^62 used to wrap to a few bytes, so a
    4-byte codes tensor passed the shape check for an expanded input and
    the pack ran (effectively forever) past it; now the shape is refused.
    Run in a subprocess: a regression would hang, not fail."""
    code = textwrap.dedent("""
        import torch
        from kvcompress import ops, KVCompressValueError
        D = 2**62 + 4
        x = torch.zeros(1).expand(1, 1, 1, D)
        try:
            ops.pack_values(x, 8, D, codes=torch.zeros(1, 1, 1, 4, dtype=torch.uint8),
                            mins=torch.zeros(1, 1, 1, 1), scales=torch.zeros(1, 1, 1, 1))
        except KVCompressValueError as e:
            print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: codes: expected shape [B, H, n, Db] = [1, 1, 1, 4611686018427387908]" in done.stdout


def test_a_failed_export_names_the_argument():
    """A producer whose export fails is named as the caller knows it, not as
    the internal helper's ``x``."""
    class Bad:
        def __dlpack__(self, **kw):
            raise BufferError("cannot export")

        def __dlpack_device__(self):
            return (1, 0)

    class NoExport(Bad):
        shape = (1, 1, 1, 8)

    pk = ops.pack_keys(torch.randn(1, 1, 4, 8), 4, 4)
    pv = ops.pack_values(torch.randn(1, 1, 4, 8), 4, 4)
    with pytest.raises(KVCompressValueError, match="codes: __dlpack__"):
        ops.unpack_keys(Bad(), pk.mins, pk.scales, 4, 4)
    with pytest.raises(KVCompressValueError, match="values: __dlpack__"):
        ops.pack_values(Bad(), 4, 4)
    with pytest.raises(KVCompressValueError, match="queries: __dlpack__"):
        ops.packed_attention(NoExport(), *pk, *pv, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), bits=4, group=4)


def test_cuda_introspection_matches_the_build():
    assert ops.has_cuda is bool(_C.has_cuda)
    n = ops.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if not _C.has_cuda:
        assert n == 0
