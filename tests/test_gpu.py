"""GPU-specific checks. The shared suite runs on the GPU backends through
helpers.ck where a GPU is present; here: the CUDA module's bindings check their
arguments without one, and GPU arrays stay on the GPU. (The CuPy backend's
kernels compile without a GPU in test_nvrtc.py.)"""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import convkern
from convkern.backend import cupy_gpu

def _cupy_or_skip():
    ok, reason = cupy_gpu.available()
    if not ok:
        pytest.skip(f"cupy backend unavailable: {reason}")
    import cupy

    return cupy


def test_gpu_arrays_in_gpu_arrays_out():
    cupy = _cupy_or_skip()
    x = cupy.random.standard_normal((2, 3, 8, 8), dtype=cupy.float32)
    w = cupy.random.standard_normal((4, 3, 3, 3), dtype=cupy.float32)
    y = convkern.conv2d(x, w, padding=1)
    assert isinstance(y, cupy.ndarray)
    ref = convkern.conv2d(cupy.asnumpy(x), cupy.asnumpy(w), padding=1, backend="reference")
    np.testing.assert_allclose(cupy.asnumpy(y), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="on cpu but input is on cuda"):
        convkern.conv2d(x, cupy.asnumpy(w))


def test_relu_inplace_on_gpu():
    cupy = _cupy_or_skip()
    x = cupy.asarray(np.array([-1.0, 2.0, np.nan], np.float32))
    assert convkern.relu(x, inplace=True) is x
    out = cupy.asnumpy(x)
    assert out[0] == 0 and out[1] == 2 and np.isnan(out[2])


# ---- the cuda backend (convkern._cuda) ---------------------------------------

from convkern.backend import cuda_gpu  # noqa: E402

CONV_GEOM = (2, 3, 8, 8, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 8, 8)
POOL_GEOM = (6, 8, 8, 2, 2, 2, 2, 0, 0, 1, 1, 4, 4, 1, 0)  # convkern.geometry.POOL_GEOM_FIELDS


def _cuda_module_or_skip():
    if cuda_gpu._cuda is None:
        pytest.skip(f"convkern._cuda is not built: {cuda_gpu._IMPORT_ERROR}")
    return cuda_gpu._cuda


def test_cuda_bindings_check_arguments_before_touching_a_device():
    m = _cuda_module_or_skip()
    with pytest.raises(TypeError, match="dtype must be 'float32' or 'float64'"):
        m.relu_forward(0, 0, 4, "int8", 0)
    with pytest.raises(ValueError, match="algo must be 'direct', 'im2col' or 'implicit'"):
        m.conv2d_forward(0, 0, 0, 0, CONV_GEOM, "winograd", 0, 0, "float32", 0)
    bad_groups = CONV_GEOM[:7] + (2,) + CONV_GEOM[8:]  # groups 2 does not divide C = 3
    with pytest.raises(ValueError, match="groups must be positive and divide C and K"):
        m.conv2d_forward(0, 0, 0, 0, bad_groups, "direct", 0, 0, "float32", 0)
    with pytest.raises(ValueError, match="kernel, stride and dilation must be positive"):
        m.max_pool2d_forward(0, 0, 0, POOL_GEOM[:5] + (0,) + POOL_GEOM[6:], "float32", 0)
    with pytest.raises(ValueError, match="negative size"):
        m.gemm(0, 0, 0, -1, 2, 2, "float32", 0)
    # work sizes are pure arithmetic: G * CRS * images * P
    assert m.im2col_work_elems(CONV_GEOM, 2) == 1 * 27 * 2 * 64
    assert 1 <= m.grad_weight_splits(CONV_GEOM) <= 64


def test_cuda_kernels_say_why_without_a_device():
    m = _cuda_module_or_skip()
    if m.device_count() > 0:
        pytest.skip("a CUDA device is present: the kernels run instead (see the tests below)")
    calls = [
        lambda: m.relu_forward(0, 0, 4, "float32", 0),
        lambda: m.relu_backward(0, 0, 0, 4, "float64", 0),
        lambda: m.max_pool2d_forward(0, 0, 0, POOL_GEOM, "float32", 0),
        lambda: m.max_pool2d_backward(0, 0, 0, POOL_GEOM, "float32", 0),
        lambda: m.avg_pool2d_forward(0, 0, POOL_GEOM, "float32", 0),
        lambda: m.avg_pool2d_backward(0, 0, POOL_GEOM, "float32", 0),
        lambda: m.conv2d_forward(0, 0, 0, 0, CONV_GEOM, "implicit", 0, 0, "float32", 0),
        lambda: m.conv2d_grad_input(0, 0, 0, CONV_GEOM, "im2col", 0, 0, "float32", 0),
        lambda: m.conv2d_grad_weight(0, 0, 0, CONV_GEOM, "implicit", 1, 0, "float32", 0),
        lambda: m.conv2d_grad_bias(0, 0, CONV_GEOM, "float32", 0),
        lambda: m.gemm(0, 0, 0, 2, 2, 2, "float32", 0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            call()
    ok, reason = cuda_gpu.available()
    assert not ok and reason


def _cuda_backend_or_skip():
    ok, reason = cuda_gpu.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    import cupy

    return cupy


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
def test_cuda_backward_is_bit_identical_across_runs(algo):
    cupy = _cuda_backend_or_skip()
    rng = np.random.default_rng(7)
    x = cupy.asarray(rng.standard_normal((16, 32, 28, 28), dtype=np.float32))
    w = cupy.asarray(rng.standard_normal((64, 32, 3, 3), dtype=np.float32))
    gy = cupy.asarray(rng.standard_normal((16, 64, 28, 28), dtype=np.float32))
    first = convkern.conv2d_backward(gy, x, w, padding=1, algo=algo, backend="cuda")
    again = convkern.conv2d_backward(gy, x, w, padding=1, algo=algo, backend="cuda")
    for a, b in zip(first, again):
        assert cupy.array_equal(a, b)
    ref = convkern.conv2d_backward(*(cupy.asnumpy(a) for a in (gy, x, w)), padding=1, backend="cpp")
    for a, r in zip(first, ref):
        np.testing.assert_allclose(cupy.asnumpy(a), r, rtol=2e-3, atol=2e-3)


def test_cuda_tensors_larger_than_l2():
    """An H100's L2 is 50 MB: these inputs are 64-100 MB."""
    cupy = _cuda_backend_or_skip()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 64, 112, 112), dtype=np.float32)  # 103 MB
    gx = cupy.asarray(x)
    np.testing.assert_array_equal(cupy.asnumpy(convkern.relu(gx, backend="cuda")), np.maximum(x, 0))
    y, ind = convkern.max_pool2d(gx, 2, return_indices=True, backend="cuda")
    ry, rind = convkern.max_pool2d(x, 2, return_indices=True, backend="cpp")
    np.testing.assert_array_equal(cupy.asnumpy(y), ry)
    np.testing.assert_array_equal(cupy.asnumpy(ind), rind)
    xs = rng.standard_normal((16, 64, 128, 128), dtype=np.float32)  # 67 MB
    ws = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
    for algo in ("direct", "im2col", "implicit"):
        out = convkern.conv2d(cupy.asarray(xs), cupy.asarray(ws), padding=1, algo=algo, backend="cuda")
        np.testing.assert_allclose(cupy.asnumpy(out), convkern.conv2d(xs, ws, padding=1, backend="cpp"),
                                   rtol=1e-3, atol=1e-3)


def test_cuda_takes_views_and_offsets():
    cupy = _cuda_backend_or_skip()
    rng = np.random.default_rng(5)
    base = cupy.asarray(rng.standard_normal((3, 6, 20, 21), dtype=np.float64))
    w = cupy.asarray(rng.standard_normal((5, 6, 3, 3), dtype=np.float64))
    for view in (base[1:, :, 2:-1:2, ::2], base[::-1, :, :, ::-1], base.transpose(0, 1, 3, 2)):
        out = convkern.conv2d(view, w, padding=1, backend="cuda")
        ref = convkern.conv2d(cupy.asnumpy(view), cupy.asnumpy(w), padding=1, backend="reference")
        np.testing.assert_allclose(cupy.asnumpy(out), ref, rtol=1e-10, atol=1e-10)
    flat = cupy.asarray(rng.standard_normal(1001, dtype=np.float32))
    odd = flat[1:]  # 4-byte offset: relu's 16-byte vector path must not be taken
    np.testing.assert_array_equal(cupy.asnumpy(convkern.relu(odd, backend="cuda")),
                                  np.maximum(cupy.asnumpy(odd), 0))


def test_cuda_gemm_against_cupy():
    cupy = _cuda_backend_or_skip()
    rng = np.random.default_rng(11)
    for m, k, n in [(1, 1, 1), (63, 17, 65), (64, 16, 64), (257, 300, 129)]:
        a = cupy.asarray(rng.standard_normal((m, k)))
        b = cupy.asarray(rng.standard_normal((k, n)))
        np.testing.assert_allclose(cupy.asnumpy(cuda_gpu.gemm(a, b)), cupy.asnumpy(a @ b), rtol=1e-12, atol=1e-12)


def test_cuda_max_pool_backward_foreign_and_bad_indices():
    cupy = _cuda_backend_or_skip()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    gy = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    ind = rng.integers(0, 64, size=(2, 3, 4, 4))  # in the plane, mostly outside their own windows
    want = convkern.max_pool2d_backward(gy, x, ind, 2, backend="cpp")
    got = convkern.max_pool2d_backward(cupy.asarray(gy), cupy.asarray(x), cupy.asarray(ind), 2, backend="cuda")
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-6, atol=1e-6)
    ind[0, 0, 0, 0] = 64
    with pytest.raises(ValueError, match="indices"):
        convkern.max_pool2d_backward(cupy.asarray(gy), cupy.asarray(x), cupy.asarray(ind), 2, backend="cuda")


def test_cuda_takes_torch_cuda_tensors_zero_copy():
    cupy = _cuda_backend_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x = torch.randn(2, 3, 9, 9, device="cuda")
    w = torch.randn(4, 3, 3, 3, device="cuda")
    out = convkern.conv2d(x, w, padding=1, backend="cuda")
    assert isinstance(out, cupy.ndarray)
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    np.testing.assert_allclose(cupy.asnumpy(out), ref.cpu().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_out_of_memory_is_a_memory_error_and_the_library_keeps_working(backend):
    ok, reason = convkern.backend.info(backend).available, convkern.backend.info(backend).reason
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    import cupy

    x = cupy.ones((1, 1, 1, 1), cupy.float32)
    w = cupy.ones((1, 1, 1, 1), cupy.float32)
    with pytest.raises(MemoryError):  # a (1, 1, 200001, 200001) float32 output: 160 GB
        convkern.conv2d(x, w, padding=100_000, backend=backend)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((2, 3, 9, 9), dtype=np.float32)
    ws = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    out = convkern.conv2d(cupy.asarray(xs), cupy.asarray(ws), padding=1, backend=backend)
    np.testing.assert_allclose(cupy.asnumpy(out), convkern.conv2d(xs, ws, padding=1, backend="reference"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_patched_torch_model_on_cuda_tensors(backend):
    """convkern.torch on CUDA tensors: DLPack both ways on torch's current
    stream; a patched LeNet's logits and gradients against the unpatched one
    (float64, so any difference is the kernels', not rounding)."""
    info = convkern.backend.info(backend)
    if not info.available:
        pytest.skip(f"{backend} backend unavailable: {info.reason}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import copy

    import convkern.torch as ckt
    from convkern.torch.nets import LeNet

    torch.manual_seed(0)
    model = LeNet(num_classes=5).double().cuda().eval()
    patched = ckt.patch(copy.deepcopy(model), backend=backend)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # a non-default stream: the kernels must run on it
        outs = []
        for m in (model, patched):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.sum().backward()
            outs.append((y.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
            m.zero_grad()
    stream.synchronize()
    (y1, g1, p1), (y2, g2, p2) = outs
    assert y2.is_cuda and not ckt.report(patched).fallbacks
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_single_rank_nccl_through_data_parallel_buckets(tmp_path):
    """The most NCCL that can run on a one-GPU machine: one rank's allreduce
    and broadcast of DataParallel's buckets leave them unchanged."""
    _cupy_or_skip()
    import importlib
    import json
    import os
    import sys

    try:
        importlib.import_module("cupy.cuda.nccl")
        importlib.import_module("mpi4py")
    except ImportError as exc:
        pytest.skip(f"NCCL through CuPy and mpi4py are needed: {exc}")
    mpiexec = pathlib.Path(sys.executable).with_name("mpiexec")
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    worker = str(pathlib.Path(__file__).with_name("dist_worker.py"))
    p = subprocess.run([mpiexec, "-n", "1", sys.executable, worker, "nccl", str(tmp_path)], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "nccl.json").read_text()) == {"ok": True}
