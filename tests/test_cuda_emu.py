"""The CUDA kernels' paths that the shared suite's small shapes do not reach,
run on the CPU emulator (tests/cuda_emu; the shared suite runs on it as the
backend "cuda-emu"): the tiled GEMM at its tile edges in each of its tile
shapes (which must also give the same bits), grad weight split over
several slices of its reduction, im2col in chunks of images, relu on
unaligned pointers, depthwise layers too wide for the shared-memory tile, the
64-bit index instantiations (taken on a GPU only past 2^31 elements), and the
kernels with barriers (tiled GEMM, depthwise tile, grad bias) with each
block's threads run last to first, which exposes the races a missing
barrier causes that the first-to-last order hides."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

import convkern
from convkern.geometry import conv2d_geometry
from cuda_emu.backend import CUPY_NAME, NAME
from helpers import assert_close, randn
from test_conv2d import AWKWARD, check_conv
from test_pool2d import AVG_CASES, MAX_CASES, check_avg, check_max


@pytest.fixture
def emu():
    info = {b.name: b for b in convkern.backends()}.get(NAME)
    if info is None:
        pytest.skip("the CUDA emulator is switched off (CONVKERN_CUDA_EMU=0)")
    if not info.available:
        pytest.skip(f"the CUDA emulator is unavailable: {info.reason}")
    return convkern.backend.get(NAME)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mkn", [(1, 1, 1), (63, 17, 65), (64, 16, 64), (65, 33, 129), (130, 7, 1), (5, 0, 3)])
def test_gemm_tile_edges(emu, rng, dtype, mkn):
    m, k, n = mkn
    a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
    assert_close(emu.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), dtype, f"{m}x{k}x{n}")


@pytest.mark.parametrize("stride", [2**31 - 1, 2**20])
def test_depthwise_with_a_huge_stride_skips_the_shared_memory_tile(emu, rng, stride):
    """The staged tile's size is (31 * stride) x (7 * stride) elements: with a
    stride near 2^31 the product overflowed into a small size, and the launch
    asked for a nonsense configuration (found by the fuzz test)."""
    x, w = randn(rng, (1, 2, 3, 3), np.float32), randn(rng, (2, 1, 1, 1), np.float32)
    got = convkern.conv2d(x, w, stride=stride, groups=2, backend=NAME)
    want = convkern.conv2d(x, w, stride=stride, groups=2, backend="reference")
    assert_close(got, want, np.float32, f"stride {stride}")


def test_grad_weight_split_over_the_reduction(emu, rng):
    x, w = randn(rng, (4, 3, 64, 64), np.float64), randn(rng, (5, 3, 3, 3), np.float64)
    g = conv2d_geometry(x.shape, w.shape, padding=1)
    assert emu.gpu_module._cuda.grad_weight_splits(g.as_tuple()) == 4
    gy = randn(rng, (4, 5, 64, 64), np.float64)
    got = convkern.conv2d_backward(gy, x, w, padding=1, algo="implicit", backend=NAME)
    want = convkern.conv2d_backward(gy, x, w, padding=1, backend="reference")
    for name, o, r in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(o, r, np.float64, name)


def test_im2col_in_chunks_of_images(emu, rng, monkeypatch):
    x, w = randn(rng, (5, 4, 9, 7), np.float32), randn(rng, (6, 2, 3, 2), np.float32)
    b = randn(rng, (6,), np.float32)
    kw = dict(stride=(2, 1), padding=1, groups=2)
    # room for the column matrices of two images: chunks of 2, 2 and 1
    per_image = 4 * 3 * 2 * 5 * 8
    monkeypatch.setattr(emu.gpu_module, "_WORK_BYTES", 2 * per_image * 4)
    y = convkern.conv2d(x, w, b, algo="im2col", backend=NAME, **kw)
    assert_close(y, convkern.conv2d(x, w, b, backend="reference", **kw), np.float32, "forward")
    gy = randn(rng, y.shape, np.float32)
    got = convkern.conv2d_backward(gy, x, w, algo="im2col", backend=NAME, **kw)
    want = convkern.conv2d_backward(gy, x, w, backend="reference", **kw)
    assert_close(got[0], want[0], np.float32, "grad_input")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 9, 1000])
def test_relu_on_unaligned_pointers(emu, rng, dtype, n):
    cuda = emu.gpu_module._cuda
    name = np.dtype(dtype).name
    x = randn(rng, n + 1, dtype)[1:]  # one element past a 16-byte boundary: the scalar kernel
    y = np.full(n + 1, np.nan, dtype)[1:]
    cuda.relu_forward(x.ctypes.data, y.ctypes.data, n, name, 0)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    gy, gx = randn(rng, n + 1, dtype)[1:], np.full(n + 1, np.nan, dtype)[1:]
    cuda.relu_backward(gy.ctypes.data, x.ctypes.data, gx.ctypes.data, n, name, 0)
    np.testing.assert_array_equal(gx, np.where(x > 0, gy, 0))


@pytest.mark.parametrize("dilation", [1, 100], ids=["tiled", "too_wide_for_the_tile"])
def test_depthwise_forward(emu, rng, dilation):
    x, w = randn(rng, (2, 3, 210, 205), np.float32), randn(rng, (6, 1, 3, 3), np.float32)
    kw = dict(stride=(1, 2), padding=1, dilation=dilation, groups=3)
    assert_close(convkern.conv2d(x, w, algo="direct", backend=NAME, **kw),
                 convkern.conv2d(x, w, backend="reference", **kw), np.float32, f"dilation {dilation}")


def test_the_emulator_builds_where_it_can():
    """A compile error in the emulated build must fail here, not turn every
    emulated test into a skip."""
    if os.environ.get("CONVKERN_CUDA_EMU", "1") == "0":
        pytest.skip("the CUDA emulator is switched off (CONVKERN_CUDA_EMU=0)")
    if shutil.which(os.environ.get("CXX") or "g++") is None or importlib.util.find_spec("pybind11") is None:
        pytest.skip("no C++ compiler or no pybind11: the emulator cannot be built here")
    for name in (NAME, CUPY_NAME):
        info = {b.name: b for b in convkern.backends()}[name]
        assert info.available, info.reason


def _switch_on(emu, name: str):
    """Sets one of the emulator's switches (runtime.cpp) for a test, then clears it."""
    switch = getattr(ctypes.CDLL(emu.gpu_module._cuda.__file__), name)
    switch(1)
    yield
    switch(0)


# convkern::cuda::GemmTile (cuda/gemm_tiled.cuh): the shapes float can take
GEMM_TILES = {"64x64": 1, "64x128": 2, "128x64": 3, "128x128": 4}


@contextlib.contextmanager
def _forced_tile(emu, tile: int):
    """The module's own tuning hook (_cuda.set_gemm_tile), cleared afterwards."""
    emu.gpu_module._cuda.set_gemm_tile(tile)
    try:
        yield
    finally:
        emu.gpu_module._cuda.set_gemm_tile(0)


@pytest.fixture(params=list(GEMM_TILES))
def gemm_tile(request, emu):
    with _forced_tile(emu, GEMM_TILES[request.param]):
        yield


def test_set_gemm_tile_checks_its_argument(emu):
    cuda = emu.gpu_module._cuda
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=f"gemm tile must be 0 .* got {bad}"):
            cuda.set_gemm_tile(bad)
    assert cuda.gemm_tile() == 0
    with _forced_tile(emu, 3):
        assert cuda.gemm_tile() == 3
    assert cuda.gemm_tile() == 0


@pytest.mark.parametrize("mkn", [(1, 1, 1), (127, 9, 129), (128, 8, 128), (129, 17, 65), (200, 3, 7), (5, 0, 300)])
def test_gemm_tile_edges_per_tile(emu, gemm_tile, rng, mkn):
    m, k, n = mkn
    a, b = randn(rng, (m, k), np.float32), randn(rng, (k, n), np.float32)
    assert_close(emu.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), np.float32, f"{m}x{k}x{n}")


@pytest.mark.parametrize("algo", ["im2col", "implicit"])
@pytest.mark.parametrize("case", ["plain_3x3", "groups", "batch_1_prime_sizes", "gemm_tile_edges", "pointwise",
                                  "padding_past_dilated_taps_wide_reduction", "dilation", "stride_per_axis"])
def test_conv_per_gemm_tile(emu, gemm_tile, rng, algo, case):
    x_shape, w_shape, kw = AWKWARD[case]
    check_conv(NAME, algo, np.float32, rng, x_shape, w_shape, **kw)


def test_gemm_tiles_give_the_same_bits(emu, rng):
    """Each output is one thread's sum in k order whatever the tile, so the
    host's choice of tile (which depends on the GPU) cannot change a result."""
    x, w = randn(rng, (3, 20, 23, 19), np.float32), randn(rng, (130, 20, 3, 3), np.float32)
    gy = randn(rng, (3, 130, 23, 19), np.float32)
    results = {}
    for name, tile in GEMM_TILES.items():
        with _forced_tile(emu, tile):
            y = convkern.conv2d(x, w, padding=1, algo="implicit", backend=NAME)
            results[name] = (y, *convkern.conv2d_backward(gy, x, w, padding=1, algo="implicit", backend=NAME))
    first = results["64x64"]
    assert_close(first[0], convkern.conv2d(x, w, padding=1, backend="reference"), np.float32, "forward")
    for name, got in results.items():
        for what, a, b in zip(("forward", "grad_input", "grad_weight", "grad_bias"), got, first):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: tile {name} differs from 64x64")


@pytest.fixture
def index64(emu):
    yield from _switch_on(emu, "ck_emu_force_index64")


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
@pytest.mark.parametrize("case", list(AWKWARD), ids=list(AWKWARD))
def test_conv_with_64_bit_indices(emu, index64, rng, algo, case):
    x_shape, w_shape, kw = AWKWARD[case]
    check_conv(NAME, algo, np.float32, rng, x_shape, w_shape, **kw)


@pytest.mark.parametrize("case", list(MAX_CASES), ids=list(MAX_CASES))
def test_max_pool_with_64_bit_indices(emu, index64, rng, case):
    shape, kw = MAX_CASES[case]
    check_max(NAME, np.float64, rng, randn(rng, shape, np.float64), kw)


@pytest.mark.parametrize("case", list(AVG_CASES), ids=list(AVG_CASES))
def test_avg_pool_with_64_bit_indices(emu, index64, rng, case):
    shape, kw = AVG_CASES[case]
    check_avg(NAME, np.float64, rng, randn(rng, shape, np.float64), kw)


@pytest.fixture
def reversed_threads(emu):
    yield from _switch_on(emu, "ck_emu_reverse_threads")


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
@pytest.mark.parametrize("case", ["plain_3x3", "groups", "depthwise", "wide_depthwise", "batch_1_prime_sizes",
                                  "dilation", "stride_per_axis"])
def test_barrier_kernels_with_threads_in_reverse(emu, reversed_threads, rng, algo, case):
    x_shape, w_shape, kw = AWKWARD[case]
    check_conv(NAME, algo, np.float32, rng, x_shape, w_shape, **kw)


def test_the_gemm_tile_sweep_runs(emu, tmp_path, capsys):
    """tools/gemm_tiles.py (the tile sweep for a GPU) on the emulator, so the
    script works when a GPU comes; the times mean nothing here."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "gemm_tiles.py")
    spec = importlib.util.spec_from_file_location("gemm_tiles", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "tiles.json"
    assert tool.main(["--backend", NAME, "--layers", "mnist_conv1", "--batch", "1", "--reps", "1",
                      "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["layer"], r["pass_"]) for r in rows] == [("mnist_conv1", "forward"), ("mnist_conv1", "backward")]
    assert all(set(r["ms"]) == set(tool.TILES) and min(r["ms"].values()) > 0 for r in rows)
    assert "mnist_conv1" in capsys.readouterr().out
    assert emu.gpu_module._cuda.gemm_tile() == 0



def _index_rule_holds(module, stride: int) -> None:
    limit = 2**31 - 1
    assert module.MAX_GRID_STRIDE == stride
    # the last bound whose grid-stride loop still steps inside int32, and the first that would wrap
    assert module.index_fits_int32(limit - stride - 1)
    assert not module.index_fits_int32(limit - stride)
    # a 512x64x224x224 tensor (1.64e9 elements) passes 2^31 - stride on the real grid cap
    assert module.index_fits_int32(512 * 64 * 224 * 224) == (512 * 64 * 224 * 224 + stride < limit)


def test_index_type_leaves_room_for_the_grid_stride(emu):
    _index_rule_holds(emu.gpu_module._cuda, 3 * 256)  # the emulator's lowered grid cap: 3 blocks of 256


def test_index_type_rule_of_the_real_cuda_module():
    try:
        from convkern import _cuda
    except ImportError as exc:
        pytest.skip(f"convkern._cuda was not built here (no nvcc at build time): {exc}")
    _index_rule_holds(_cuda, 65535 * 32 * 256)
    assert not _cuda.index_fits_int32(512 * 64 * 224 * 224)  # max_pool2d_backward's gather would have wrapped


def test_gemm_tile_rule_counts_waves(emu):
    """The float GEMM's tile rule on a 132-SM GPU (1-4: 64x64, 64x128, 128x64, 128x128)."""
    pick = emu.gpu_module._cuda.gemm_tile_for
    assert pick(4096, 4096, 1, 132) == 4              # 8 full waves of 128x128 tiles
    assert pick(1024, 1024, 1, 132) == 1              # 64 big tiles would leave half the SMs idle
    assert pick(64, 100000, 1, 132) in (1, 2)         # never 128 rows over 64
    assert pick(100000, 48, 1, 132) in (1, 3)         # never 128 columns over 48
    # 133 tiles of 128x128 are two waves, the second with one block: 64x64 makes it
    # three well-filled waves at a lower FFMA share; the model counts both
    assert pick(128, 128 * 133, 1, 132) in (1, 4)
    assert pick(256, 128 * 98, 1, 0) == 4             # an unknown SM count still prefers big tiles on big problems


def test_the_compiled_modules_share_the_geometry_layout_python_packs(emu):
    from convkern.backend import cpp
    from convkern.geometry import CONV_GEOM_FIELDS, POOL_GEOM_FIELDS, check_layout

    expected = (",".join(CONV_GEOM_FIELDS), ",".join(POOL_GEOM_FIELDS))
    assert cpp._cpu.geometry_fields() == expected
    assert emu.gpu_module._cuda.geometry_fields() == expected
    check_layout("the emulated _cuda", emu.gpu_module._cuda.geometry_fields())
    with pytest.raises(ImportError, match="another geometry layout"):
        check_layout("a stale build", ("N,C,H,W,K,R,S,G,sh,sw,ph,pw,Ho,Wo,dh,dw", expected[1]))


@pytest.mark.parametrize("bad, says", [
    ({"groups": 0}, "groups must be positive"), ({"stride": 0}, "stride and dilation"), ({"N": -1}, "negative"),
])
def test_both_modules_refuse_a_malformed_conv_geometry_alike(emu, bad, says):
    from convkern.backend import cpp
    from convkern.geometry import CONV_GEOM_FIELDS

    fields = dict(zip(CONV_GEOM_FIELDS, (2, 4, 8, 8, 6, 3, 3, 2, 1, 1, 1, 1, 1, 1, 8, 8)))
    key = {"groups": "G", "stride": "sh", "N": "N"}[next(iter(bad))]
    fields[key] = next(iter(bad.values()))
    geom = tuple(fields.values())
    with pytest.raises(ValueError, match=says):
        cpp._cpu.conv_auto_algo(geom, False, "float32")
    with pytest.raises(ValueError, match=says):
        emu.gpu_module._cuda.im2col_work_elems(geom, 1)
