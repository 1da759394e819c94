"""The CuPy backend's kernels are the CUDA module's, compiled at run time by
NVRTC. nvcc builds them for the module on every CI run; this compiles the
exact translation unit and name expressions cupy_gpu hands CuPy with NVRTC
itself (no GPU needed: NVRTC only emits PTX), so a kernel header that nvcc
accepts and NVRTC does not (a standard-library include, a host-only call)
fails here rather than on a user's GPU."""

import ctypes
import ctypes.util
import glob
import os

import pytest

from convkern.backend import cupy_gpu


def _nvrtc():
    candidates = []
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel (the test extra, Linux x86-64)

        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in os.path.basename(path):
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc, part of the test extra on Linux x86-64)")


def _check(lib, status, what, prog=None):
    if status == 0:
        return
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    message = lib.nvrtcGetErrorString(status).decode()
    log = ""
    if prog is not None:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
    pytest.fail(f"{what}: {message}\n{log}")


def test_the_headers_cupy_compiles_are_in_the_package():
    for name in ("geometry.h", "gpu/device.cuh", "gpu/relu.cuh", "gpu/max_pool2d.cuh", "gpu/avg_pool2d.cuh",
                 "gpu/conv2d_direct.cuh", "gpu/im2col.cuh"):
        assert (cupy_gpu.INCLUDE_DIR / "convkern" / name).is_file(), name


@pytest.mark.parametrize("arch", ["compute_75", "compute_90"])
def test_nvrtc_compiles_the_cupy_backends_kernels(arch):
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    source = cupy_gpu.kernel_source().encode()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"convkern_gpu.cu", 0, None, None), "create")
    names = cupy_gpu.name_expressions()
    # each kernel for float and double, once where it has no element type
    assert len(names) == sum(2 if "T" in params else 1 for params in cupy_gpu._KERNELS.values())
    for name in names:
        _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()), f"name expression {name}")
    options = [o.encode() for o in cupy_gpu.compile_options()] + [f"--gpu-architecture={arch}".encode()]
    argv = (ctypes.c_char_p * len(options))(*options)
    try:
        _check(lib, lib.nvrtcCompileProgram(prog, len(options), argv), "compile", prog)
        for name in names:
            lowered = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), f"lowered {name}")
            assert lowered.value and lowered.value.startswith(b"_Z"), name
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "PTX")
        assert b".entry" in ptx.value and ptx.value.count(b".entry") == len(names)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_the_structs_cupy_passes_by_value_have_the_c_layout():
    from convkern.geometry import CONV_GEOM_FIELDS, POOL_GEOM_FIELDS

    for dtype, fields in ((cupy_gpu.CONV_GEOM_DTYPE, CONV_GEOM_FIELDS), (cupy_gpu.POOL_GEOM_DTYPE, POOL_GEOM_FIELDS)):
        assert dtype.names == fields
        assert dtype.itemsize == 8 * len(fields) and dtype.isalignedstruct  # static_assert'ed in geometry.h
        assert [dtype.fields[f][1] for f in fields] == [8 * i for i in range(len(fields))]
