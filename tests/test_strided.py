"""Views the kernels cannot read as they are (transposes, channels_last,
slices, broadcasts, another byte order) give the same results as their
contiguous copies, and the elementwise ops and pooling take them a bounded
block at a time: peak memory stays at the output plus a few blocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convkern as ck
from convkern import strided

SMALL_BLOCK = 4096  # bytes: many blocks even on small arrays


def _views(rng, dtype):
    base = rng.standard_normal((3, 5, 17, 13)).astype(dtype)
    return {
        "transposed": base.transpose(0, 1, 3, 2),
        "channels_last": np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
        "sliced": rng.standard_normal((3, 5, 34, 13)).astype(dtype)[:, :, ::2],
        "broadcast": np.broadcast_to(rng.standard_normal((1, 5, 1, 13)).astype(dtype), (3, 5, 17, 13)),
        "byteswapped": base.astype(np.dtype(dtype).newbyteorder(">")),
        "unbatched": base[1].transpose(0, 2, 1),
    }


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(strided, "BLOCK_BYTES", SMALL_BLOCK)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_match_their_contiguous_copies(small_blocks, dtype):
    rng = np.random.default_rng(0)
    for name, v in _views(rng, dtype).items():
        c = np.ascontiguousarray(v, dtype=dtype)
        assert strided.worth_blocking(v, np.dtype(dtype)), name
        assert np.array_equal(ck.relu(v), ck.relu(c)), name
        assert np.array_equal(ck.relu_backward(v[::-1], v), ck.relu_backward(np.ascontiguousarray(c[::-1]), c)), name
        for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True)):
            y, i = ck.max_pool2d(v, return_indices=True, **kw)
            y2, i2 = ck.max_pool2d(c, return_indices=True, **kw)
            assert np.array_equal(y, y2) and np.array_equal(i, i2), name
            assert np.array_equal(ck.max_pool2d(v, **kw), y2), name
            assert np.array_equal(ck.avg_pool2d(v, count_include_pad=False, **kw),
                                  ck.avg_pool2d(c, count_include_pad=False, **kw)), name
            gy = np.broadcast_to(rng.standard_normal(y.shape[-1:]).astype(dtype), y.shape)
            gyc = np.ascontiguousarray(gy)
            assert np.array_equal(ck.max_pool2d_backward(gy, v, i.transpose(*range(i.ndim - 2), -1, -2).swapaxes(-1, -2),
                                                         **kw),
                                  ck.max_pool2d_backward(gyc, c, i2, **kw)), name
            assert np.array_equal(ck.avg_pool2d_backward(gy, v, **kw), ck.avg_pool2d_backward(gyc, c, **kw)), name


def test_relu_inplace_on_a_strided_view_writes_through(small_blocks):
    w = np.random.default_rng(1).standard_normal((4, 6, 20, 20)).astype(np.float32)
    v = w.transpose(0, 1, 3, 2)
    want = np.maximum(v, 0)
    assert ck.relu(v, inplace=True) is v
    assert np.array_equal(w.transpose(0, 1, 3, 2), want)


def test_blocks_cover_every_element_once():
    for shape in [(3, 5, 17, 13), (1, 1, 1000), (7,), (2, 3, 4096), (1, 1, 3, 70000)]:
        seen = np.zeros(shape, np.int32)
        itemsize = 4
        for idx in strided.blocks(shape, itemsize):
            blk = seen[idx]
            assert blk.size * itemsize <= max(strided.BLOCK_BYTES, shape[-1] * itemsize)
            assert blk.flags.c_contiguous or blk.size == 0
            seen[idx] += 1
        assert (seen == 1).all(), shape


_PEAK = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import convkern as ck

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    op = sys.argv[1]
    one = np.broadcast_to(np.float32(1.5), (1, 1, 2 ** 14, 2 ** 14))       # 2^28 elements, 4 bytes of data
    warm = np.broadcast_to(np.float32(1.5), (1, 1, 64, 64))
    ck.relu(warm); ck.relu_backward(warm, warm); ck.avg_pool2d(warm, 2)   # load the kernels first
    planes = np.broadcast_to(np.float32(-0.5), (64, 64, 256, 256))      # 2^28 elements of 256 KiB planes
    ck.max_pool2d(planes[:1, :1], 2, return_indices=True); ck.max_pool2d_backward(planes[:1, :1, ::2, ::2], planes[:1, :1],
        np.zeros((1, 1, 128, 128), np.int64), 2)
    before = peak_mib()
    if op == "relu":
        out = ck.relu(one)
    elif op == "relu_backward":
        out = ck.relu_backward(one, one)
    elif op == "max_pool2d":
        out = ck.max_pool2d(planes, 2, return_indices=True)
    elif op == "avg_pool2d_backward":
        out = ck.avg_pool2d_backward(planes[:, :, ::2, ::2], planes, 2)
    nbytes = sum(o.nbytes for o in (out if isinstance(out, tuple) else (out,)))
    print(peak_mib() - before, nbytes / 2 ** 20)
""")


@pytest.mark.parametrize("op", ["relu", "relu_backward", "max_pool2d", "avg_pool2d_backward"])
def test_peak_memory_of_a_broadcast_view_is_the_output_plus_a_bound(op, tmp_path):
    """A 2^28-element broadcast view (four bytes of data): the op's peak RSS
    grows by its output and at most 64 MiB, not by a whole copy of the input."""
    p = subprocess.run([sys.executable, "-c", _PEAK, op], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    grew, out_mib = map(float, p.stdout.split())
    assert out_mib >= 256
    assert grew <= out_mib + 64, f"{op}: peak grew {grew:.0f} MiB for an output of {out_mib:.0f} MiB"
