"""Property-based fuzzing of the public ops with extreme arguments: zero-size
dimensions, huge and negative stride/padding/dilation, NaN/inf values, wrong
dtypes, byte-swapped, read-only, negative-stride and channels_last views. Each case either
gives the float64 reference's answer or raises ValueError/TypeError/MemoryError
exactly when the reference does - never a crash, a hang or a different answer.

CONVKERN_FUZZ_EXAMPLES sets the examples per op (default 150; the campaign in
the closing note ran 5000 per op and backend)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import convkern as ck

EXAMPLES = int(os.environ.get("CONVKERN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
ERRORS = (ValueError, TypeError, MemoryError)
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
BACKENDS = [b.name for b in ck.backends() if b.available and b.device == "cpu" and b.name != "reference"]

# mostly small, sometimes hostile: huge values overflow 32-bit index arithmetic
# and must end in a clean error (or, for stride, a tiny output)
small = st.integers(0, 4)
knob = st.one_of(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**40, 2**62]))
pad = st.one_of(st.integers(0, 2), st.integers(0, 2), st.sampled_from([-1, 3, 2**20, 2**31 - 1, 2**31, 2**62]))
MAX_OUT = 2**22  # larger outputs are MemoryError territory (tests/test_hardening.py), not fuzz material


def _small_enough(geometry, *args, **kwargs) -> None:
    """Reject (hypothesis.assume) problems whose output is too big to compute
    in a fuzz loop; invalid ones go through, to check the errors agree."""
    try:
        g = geometry(*args, **kwargs)
    except ERRORS:
        return
    assume(int(np.prod(g.output_shape, dtype=object)) <= MAX_OUT)


@st.composite
def arrays(draw, shape):
    """An array of `shape` with awkward values and an awkward layout/dtype."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float64, np.float16, np.int32]))
    # magnitudes up to 1e15: products stay finite in float32, where the float64
    # reference and a float32 accumulation would overflow differently
    a = np.asarray(rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-3, 1e15])))
    if a.size and draw(st.booleans()):
        flat = a.reshape(-1)
        k = draw(st.integers(1, min(3, flat.size)))
        flat[rng.integers(0, flat.size, k)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(all="ignore"):  # 1e30 overflows float16, NaN has no int32
        a = np.asarray(a.astype(dtype))
    layout = draw(st.sampled_from(["c", "c", "reversed", "strided", "swapped", "readonly", "channels_last",
                                   "channels_last_swapped"]))
    if layout == "reversed" and a.ndim:
        a = np.ascontiguousarray(a[..., ::-1])[..., ::-1]  # same values, negative last stride
    elif layout == "strided" and a.ndim:
        b = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
        b[..., ::2] = a
        a = b[..., ::2]
    elif layout == "swapped":
        a = a.astype(a.dtype.newbyteorder(">"))
    elif layout == "readonly":
        a.flags.writeable = False
    elif layout.startswith("channels_last") and a.ndim == 4:  # NHWC strides, as torch's channels_last
        a = np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        if layout.endswith("swapped"):
            a = a.astype(a.dtype.newbyteorder(">"))
    return a


def _compare(fn, args, kwargs, backend):
    with np.errstate(all="ignore"):  # inf - inf and overflow are part of the point here
        return _compare_quietly(fn, args, kwargs, backend)


def _compare_quietly(fn, args, kwargs, backend):
    try:
        want = fn(*args, **kwargs, backend="reference")
    except ERRORS as exc:
        with pytest.raises(ERRORS):
            fn(*args, **kwargs, backend=backend)
        return type(exc).__name__
    got = fn(*args, **kwargs, backend=backend)
    wants = want if isinstance(want, tuple) else (want,)
    gots = got if isinstance(got, tuple) else (got,)
    assert len(gots) == len(wants)
    for g, w in zip(gots, wants):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype.kind == "i":
            assert np.array_equal(g, w)
            continue
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        fin = np.isfinite(w)
        np.testing.assert_array_equal(g[~fin & ~np.isnan(w)], w[~fin & ~np.isnan(w)])  # same infinities
        if fin.any():
            scale = max(float(np.max(np.abs(w[fin]))), 1e-30)
            err = float(np.max(np.abs(g[fin].astype(np.float64) - w[fin]))) / scale
            # huge inputs can overflow to inf in one summation order and not the other
            assert err <= TOL[w.dtype] or not np.all(np.isfinite(g[fin])), f"relative error {err:.3g}"
    return "ok"


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_conv2d(backend, data):
    N, C, H, W = data.draw(small), data.draw(st.integers(0, 4)), data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9))
    groups = data.draw(st.sampled_from([1, 1, 2, 0, -1]))
    K, R, S = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))
    Cg = C // groups if groups > 0 and C % groups == 0 else data.draw(small)
    x = data.draw(arrays((N, C, H, W)))
    w = data.draw(arrays((K, Cg, R, S)))
    b = data.draw(st.one_of(st.none(), arrays((K,))))
    kw = dict(stride=data.draw(knob), padding=data.draw(st.one_of(pad, st.sampled_from(["same", "valid"]))),
              dilation=data.draw(knob), groups=groups)
    _small_enough(ck.conv2d_geometry, x.shape, w.shape, None, **kw)
    kw["algo"] = data.draw(st.sampled_from(["auto", "direct", "im2col"]))
    _compare(ck.conv2d, (x, w, b), kw, backend)
    if data.draw(st.booleans()):
        gy_shape = data.draw(st.sampled_from([(N, K, H, W), (N, K, max(H - R + 1, 0), max(W - S + 1, 0))]))
        gy = data.draw(arrays(gy_shape))
        needs = tuple(data.draw(st.booleans()) for _ in range(3))
        _compare(ck.conv2d_backward, (gy, x, w), dict(kw, needs=needs), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_pooling(backend, data):
    shape = (data.draw(small), data.draw(small), data.draw(st.integers(0, 11)), data.draw(st.integers(0, 11)))
    x = data.draw(arrays(shape))
    kernel = data.draw(st.one_of(st.integers(1, 4), st.sampled_from([0, -2, 2**31])))
    kw = dict(kernel_size=kernel, stride=data.draw(st.one_of(st.none(), knob)), padding=data.draw(pad),
              ceil_mode=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        kw["dilation"] = data.draw(knob)
        _small_enough(ck.pool2d_geometry, x.shape, **kw)
        out = _compare(ck.max_pool2d, (x,), dict(kw, return_indices=True), backend)
        if out == "ok" and np.dtype(x.dtype).kind == "f":
            y, ind = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
            gy = data.draw(arrays(y.shape))
            _compare(ck.max_pool2d_backward, (gy, x, ind), kw, backend)
    else:
        _small_enough(ck.pool2d_geometry, x.shape, **kw)
        kw.update(count_include_pad=data.draw(st.booleans()),
                  divisor_override=data.draw(st.one_of(st.none(), st.integers(1, 5), st.sampled_from([0, -1]))))
        out = _compare(ck.avg_pool2d, (x,), kw, backend)
        if out == "ok":
            y = ck.avg_pool2d(x, **kw, backend="reference")
            gy = data.draw(arrays(y.shape))
            _compare(ck.avg_pool2d_backward, (gy, x), kw, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_relu(backend, data):
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=5)))
    x = data.draw(arrays(shape))
    _compare(ck.relu, (x,), {}, backend)
    gy = data.draw(arrays(data.draw(st.sampled_from([shape, shape[::-1]]))))
    _compare(ck.relu_backward, (gy, x), {}, backend)
