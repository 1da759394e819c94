"""GPU-specific checks. The shared suite runs on the GPU backends through
helpers.ck where a GPU is present; here: the kernels compile without one, and
GPU arrays stay on the GPU."""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import convkern
from convkern.backend import cupy_gpu

KERNELS = pathlib.Path(cupy_gpu.__file__).with_name("cupy_kernels.cu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cupy_kernels_compile_for_both_dtypes(tmp_path):
    # CuPy compiles these at run time with NVRTC; nvcc here catches a syntax or
    # type error on machines without a GPU, for every kernel and dtype
    refs = "\n".join(f"  (void*)&{k}<{t}>," for k in cupy_gpu._KERNELS for t in ("float", "double"))
    src = tmp_path / "instantiate.cu"
    src.write_text(f'#include "{KERNELS}"\nvoid* all_kernels[] = {{\n{refs}\n}};\n')
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_75", "-c", str(src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


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
