"""Hardening: memory stays flat, impossible allocations are MemoryError and
leave the library working, concurrent and repeated calls agree bit for bit,
hostile model files are refused, and (opt-in, ~20 GB) tensors past 2^31
elements are indexed correctly."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import convkern as ck
import convkern.nn as nn
from convkern.backend import cpp
from helpers import randn


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _op_calls(rng):
    x = randn(rng, (2, 3, 9, 8), np.float32)
    w = randn(rng, (4, 3, 3, 3), np.float32)
    y = ck.conv2d(x, w, padding=1, backend="cpp")
    p, ind = ck.max_pool2d(x, 2, return_indices=True, backend="cpp")
    a = ck.avg_pool2d(x, 3, 2, 1, backend="cpp")
    return {
        "conv2d direct": lambda: ck.conv2d(x, w, padding=1, algo="direct", backend="cpp"),
        "conv2d im2col": lambda: ck.conv2d(x, w, padding=1, algo="im2col", backend="cpp"),
        "conv2d_backward": lambda: ck.conv2d_backward(y, x, w, padding=1, backend="cpp"),
        "max_pool2d": lambda: ck.max_pool2d(x, 2, return_indices=True, backend="cpp"),
        "max_pool2d_backward": lambda: ck.max_pool2d_backward(p, x, ind, 2, backend="cpp"),
        "avg_pool2d": lambda: ck.avg_pool2d(x, 3, 2, 1, backend="cpp"),
        "avg_pool2d_backward": lambda: ck.avg_pool2d_backward(a, x, 3, 2, 1, backend="cpp"),
        "relu": lambda: ck.relu(x, backend="cpp"),
        "relu_backward": lambda: ck.relu_backward(x, x, backend="cpp"),
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux only)")
@pytest.mark.skipif(bool(cpp._cpu and cpp._cpu.build_info().get("sanitized")),
                    reason="an ASan build holds freed memory in its quarantine: RSS says nothing there")
def test_rss_stays_flat_over_10000_calls_of_each_op(rng):
    calls = _op_calls(rng)
    for fn in calls.values():  # warm-up: workspaces, allocator pools
        for _ in range(200):
            fn()
    before = _rss_bytes()
    for fn in calls.values():
        for _ in range(10_000):
            fn()
    grown = _rss_bytes() - before
    # a leak of even 100 bytes per call would be 9 MB here
    assert grown < 8 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 90,000 calls"


def test_impossible_allocation_is_memory_error_and_the_library_recovers(rng):
    x = randn(rng, (1, 1, 2, 2), np.float32)
    w = randn(rng, (1, 1, 1, 1), np.float32)
    # a (1, 1, 2^23+2, 2^23+2) float32 output: 256 TiB, beyond any x86-64 address space
    with pytest.raises(MemoryError, match="Unable to allocate"):
        ck.conv2d(x, w, padding=2**22, backend="cpp")
    with pytest.raises(ValueError, match=r"padding must be below 2\*\*31"):  # index arithmetic stays in 64 bits
        ck.conv2d(x, w, padding=2**31, backend="cpp")
    # still fine afterwards, on every op
    for name, fn in _op_calls(rng).items():
        assert fn() is not None, name
    x = randn(rng, (2, 3, 7, 7), np.float32)
    w = randn(rng, (4, 3, 3, 3), np.float32)
    np.testing.assert_allclose(ck.conv2d(x, w, backend="cpp"), ck.conv2d(x, w, backend="reference"),
                               rtol=1e-5, atol=1e-5)


def test_concurrent_calls_of_every_op_match_serial_results(rng):
    """Kernels release the GIL and keep per-thread workspaces: eight Python
    threads hammering every op at once get exactly the serial answers."""
    problems = []
    for i in range(6):
        x = randn(rng, (3, 2 + i, 10 + i, 12), np.float32)
        w = randn(rng, (5, 2 + i, 3, 3), np.float32)
        gy = randn(rng, (3, 5, 10 + i, 12), np.float32)
        problems.append((x, w, gy))

    def work(i):
        x, w, gy = problems[i % len(problems)]
        algo = "im2col" if i % 2 else "direct"
        y = ck.conv2d(x, w, padding=1, algo=algo, backend="cpp")
        grads = ck.conv2d_backward(gy, x, w, padding=1, algo=algo, backend="cpp")
        p, ind = ck.max_pool2d(y, 2, return_indices=True, backend="cpp")
        gp = ck.max_pool2d_backward(p, y, ind, 2, backend="cpp")
        a = ck.avg_pool2d(y, 3, 2, 1, backend="cpp")
        ga = ck.avg_pool2d_backward(a, y, 3, 2, 1, backend="cpp")
        r = ck.relu_backward(y, ck.relu(y, backend="cpp"), backend="cpp")
        return (y, *grads, p, ind, gp, a, ga, r)

    serial = [work(i) for i in range(12)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, out in enumerate(pool.map(work, [j % 12 for j in range(96)])):
            for got, want in zip(out, serial[i % 12]):
                assert np.array_equal(got, want), f"call {i} differs under concurrency"


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_and_backward_are_bit_identical_across_runs_and_thread_counts(threads, rng):
    x = randn(rng, (9, 6, 14, 14), np.float32)  # 9 images: grad weight splits the batch into chunks
    w = randn(rng, (8, 6, 3, 3), np.float32)
    gy = randn(rng, (9, 8, 14, 14), np.float32)

    def everything():
        out = []
        for algo in ("direct", "im2col"):
            out.append(ck.conv2d(x, w, padding=1, algo=algo, backend="cpp"))
            out.extend(ck.conv2d_backward(gy, x, w, padding=1, algo=algo, backend="cpp"))
        p, ind = ck.max_pool2d(gy, 2, return_indices=True, backend="cpp")
        out += [p, ind, ck.max_pool2d_backward(p, gy, ind, 2, backend="cpp")]
        out += [ck.avg_pool2d(gy, 3, 2, 1, backend="cpp"), ck.relu(gy, backend="cpp")]
        return out

    ck.set_num_threads(1)
    try:
        reference = everything()
        ck.set_num_threads(threads)
        for _ in range(2):  # across runs too
            for a, b in zip(reference, everything()):
                assert np.array_equal(a, b)
    finally:
        ck.set_num_threads(0)


# ------------------------------------------------------------ model files


@pytest.fixture
def model_file(tmp_path):
    model = nn.build("small", (1, 12, 12), 3, rng=0)
    return nn.save(tmp_path / "m.npz", model, dict(arch="small", input_shape=[1, 12, 12], num_classes=3))


def _rewrite(src, dst, change):
    """Copy a model .npz member by member, letting change(name, bytes) edit each."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)
    return dst


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _header(meta) -> bytes:
    return _npy(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


@pytest.mark.parametrize("attack, match", [
    ("truncated", "not a readable"),
    ("flipped_bytes", "corrupt|not a readable"),
    ("pickled_object_array", "corrupt"),
    ("int_weights", "dtype int32"),
    ("huge_declared_shape", "too large|corrupt"),
    ("future_version", "format version 99"),
    ("header_not_json", "corrupt"),
    ("hostile_header_fields", "malformed architecture"),
    ("unknown_arch_kwargs", "arch_kwargs"),
    ("wrong_shape", "does not match architecture"),
])
def test_hostile_model_files_are_refused(model_file, tmp_path, attack, match):
    bad = tmp_path / "bad.npz"
    raw = model_file.read_bytes()
    meta = dict(format="convkern-model", version=1, arch="small", input_shape=[1, 12, 12], num_classes=3)
    if attack == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif attack == "flipped_bytes":
        mid = bytearray(raw)
        for i in range(len(mid) // 3, len(mid) // 3 + 64):
            mid[i] ^= 0xFF
        bad.write_bytes(bytes(mid))
    elif attack == "pickled_object_array":
        _rewrite(model_file, bad, lambda n, d: _npy(np.array([{"x": 1}], dtype=object)) if n == "param/0.weight.npy" else d)
    elif attack == "int_weights":
        _rewrite(model_file, bad, lambda n, d: _npy(np.zeros((8, 1, 3, 3), np.int32)) if n == "param/0.weight.npy" else d)
    elif attack == "huge_declared_shape":
        def huge(n, d):
            if n != "param/0.weight.npy":
                return d
            head = _npy(np.zeros((8, 1, 3, 3), np.float32))
            return head.replace(b"(8, 1, 3, 3)", b"(4611686018427387904,)".ljust(len(b"(8, 1, 3, 3)")), 1)
        _rewrite(model_file, bad, huge)
    elif attack == "future_version":
        _rewrite(model_file, bad, lambda n, d: _header(dict(meta, version=99)) if n == "__convkern__.npy" else d)
    elif attack == "header_not_json":
        _rewrite(model_file, bad, lambda n, d: _npy(np.frombuffer(b"\xff{not json", np.uint8))
                 if n == "__convkern__.npy" else d)
    elif attack == "hostile_header_fields":
        _rewrite(model_file, bad, lambda n, d: _header(dict(meta, input_shape=[1, 10**9, -3]))
                 if n == "__convkern__.npy" else d)
    elif attack == "unknown_arch_kwargs":
        _rewrite(model_file, bad, lambda n, d: _header(dict(meta, arch_kwargs={"rm_rf": True}))
                 if n == "__convkern__.npy" else d)
    elif attack == "wrong_shape":
        _rewrite(model_file, bad, lambda n, d: _npy(np.zeros((8, 1, 5, 5), np.float32))
                 if n == "param/0.weight.npy" else d)
    with pytest.raises(ValueError, match=match):
        nn.load_model(bad)
    nn.load_model(model_file)  # the good file still loads


def test_load_state_dict_refuses_non_float_values():
    model = nn.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match="weight: the state holds int64 values"):
        model.load_state_dict({"weight": np.zeros((2, 3), np.int64), "bias": np.zeros(2, np.float32)})


# ------------------------------------------------------------ past 2^31 elements

LARGE = os.environ.get("CONVKERN_LARGE_TESTS") == "1"
large = pytest.mark.skipif(not LARGE, reason="needs ~20 GB of memory and a minute: set CONVKERN_LARGE_TESTS=1")


@pytest.mark.slow
@large
def test_relu_past_2_31_elements():
    n = 2**31 + 4099
    x = np.full(n, -1.0, np.float32)
    x[2**31 - 3:] = np.arange(4102, dtype=np.float32) - 2000
    y = ck.relu(x, backend="cpp")
    np.testing.assert_array_equal(y[2**31 - 3:], np.maximum(x[2**31 - 3:], 0))
    assert y[: 2**31 - 3 : 2**20].max() == 0
    del y  # three 8.6 GB arrays at once would not fit a 24 GB machine
    gx = ck.relu_backward(x, x, backend="cpp")
    np.testing.assert_array_equal(gx[-4099:], np.where(x[-4099:] > 0, x[-4099:], 0))


@pytest.mark.slow
@large
def test_max_pool_past_2_31_elements():
    side = 46342  # side^2 > 2^31
    x = np.zeros((1, 1, side, side), np.float32)
    x[0, 0, -4:, :] = np.random.default_rng(0).standard_normal((4, side)).astype(np.float32)
    y, ind = ck.max_pool2d(x, 2, return_indices=True, backend="cpp")
    tail = x[:, :, -4:, :]
    yt, it = ck.max_pool2d(tail, 2, return_indices=True, backend="reference")
    np.testing.assert_array_equal(y[:, :, -2:, :], yt)
    np.testing.assert_array_equal(ind[:, :, -2:, :], it + (side - 4) * side)  # plane offsets past 2^31


@pytest.mark.slow
@large
def test_conv_whose_im2col_matrix_exceeds_2_31_elements():
    # C*R*S = 4608 rows of Ho*Wo = 466,489 columns: 2.15e9 elements, built in bands
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 512, 683, 683)).astype(np.float32)
    w = rng.standard_normal((2, 512, 3, 3)).astype(np.float32)
    y = ck.conv2d(x, w, padding=1, algo="im2col", backend="cpp")
    xp = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    for i, j in [(0, 0), (341, 500), (682, 682), (682, 0)]:
        want = np.einsum("crs,kcrs->k", xp[:, i:i + 3, j:j + 3], w.astype(np.float64))
        np.testing.assert_allclose(y[0, :, i, j], want, rtol=1e-4, atol=1e-3)
