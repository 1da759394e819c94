"""Build convkern's CUDA sources (cuda/) for the CPU emulator and load them.

The sources compile unchanged with g++ against include/cuda_runtime.h, apart
from two CUDA-only forms, rewritten here into a copy:

* ``kernel<T><<<grid, block, smem, stream>>>(args)`` becomes a call of
  ``ck_emu::launch`` (told whether the kernel has barriers, so that only
  those kernels pay for fibers);
* ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic
  shared memory.

cuda/device.cu (device discovery on real hardware) is replaced by the
emulator's runtime.cpp. The headers the CUDA sources include from
convkern/include (the geometry, the GPU kernels) go through the same rewrite.
The CuPy backend's translation unit (cupy_gpu.kernel_source(): the same
kernels, which CuPy compiles with NVRTC) goes into the same library, each
name expression it launches behind an extern "C" entry point (entry_symbol)
that takes its arguments the way a RawKernel launch passes them. The module
is cached under the build directory by a hash of every input, so a second
test session loads it without compiling.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_DIR = ROOT / "cuda"
SHARED_INCLUDE = ROOT / "convkern" / "include"  # the geometry and the GPU kernels, shared with cupy
SKIP = {"device.cu"}  # host code for real GPUs; runtime.cpp stands in
# CK_GEMM_MAX_GRID_Z, CK_MAX_GRID_BLOCKS: caps of 3 instead of 65535 (grid.z
# of the tiled GEMM) and 65535*32 (blocks of a grid-stride launch), so that
# the loops past the grid run in ordinary tests
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-DCK_GEMM_MAX_GRID_Z=3",
         "-DCK_MAX_GRID_BLOCKS=3"]

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*\)\s*)?(\w+)\s*\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([\w:\s]+?)\s+(\w+)\s*\[\s*\]\s*;")


class EmulatorBuildError(RuntimeError):
    """The emulated module could not be built (the message holds the compiler's output)."""


def _match_forward(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_!r} at offset {i}")


def _split_top_level(text: str) -> list:
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:j].strip())
            start = j + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def kernels_with_barriers(sources: dict) -> set:
    """Names of the __global__ functions whose bodies call __syncthreads."""
    found = set()
    for text in sources.values():
        for m in _GLOBAL.finditer(text):
            params_end = _match_forward(text, m.end() - 1, "(", ")")
            body = text.index("{", params_end)
            if "__syncthreads" in text[body:_match_forward(text, body, "{", "}")]:
                found.add(m.group(1))
    return found


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (name and template arguments) ending at `end`."""
    j = end
    while text[j - 1].isspace():
        j -= 1
    if text[j - 1] == ">":
        depth = 0
        while True:
            j -= 1
            if text[j] == ">":
                depth += 1
            elif text[j] == "<":
                depth -= 1
                if depth == 0:
                    break
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):
        j -= 1
    return j


def rewrite_launches(text: str, barriers: set) -> str:
    out, pos = [], 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            break
        start = _kernel_start(text, i)
        kernel = text[start:i].strip()
        depth, j = 0, i + 3
        while not (depth == 0 and text.startswith(">>>", j)):
            depth += text[j] in "([{"
            depth -= text[j] in ")]}"
            j += 1
        config = _split_top_level(text[i + 3:j])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"launch of {kernel}: expected 2-4 launch arguments, got {config}")
        config += ["0", "nullptr"][len(config) - 2:]
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise ValueError(f"launch of {kernel}: no argument list")
        args_end = _match_forward(text, k, "(", ")")
        args = text[k + 1:args_end - 1]
        name = re.sub(r"<.*", "", kernel, flags=re.S).split("::")[-1]
        flag = "true" if name in barriers else "false"
        out.append(text[pos:start])
        out.append(f"::ck_emu::launch({flag}, {', '.join(config)}, [](auto&&... ck_a) {{ {kernel}(ck_a...); }}, "
                   f"{args})")
        pos = args_end
    out.append(text[pos:])
    return _EXTERN_SHARED.sub(r"\1* \2 = ::ck_emu::dynamic_smem<\1>();", "".join(out))


def entry_symbol(name_expression: str) -> str:
    """The emulated library's entry point for one kernel instantiation."""
    return "ck_emu_cupy_" + re.sub(r"\W", "_", name_expression)


def cupy_unit(source: str, names, barriers: set) -> str:
    """The CuPy backend's translation unit (what it hands NVRTC) with an entry
    point per name expression, taking its arguments the way a RawKernel
    launch passes them."""
    lines = ['#include "cuda_runtime.h"', source, ""]
    for name in names:
        kernel = name.split("<")[0].split("::")[-1]
        flag = "true" if kernel in barriers else "false"
        lines.append(f'extern "C" __attribute__((visibility("default"))) int {entry_symbol(name)}('
                     f"unsigned grid, unsigned block, void** args, const std::size_t* sizes, int nargs) "
                     f"{{ return ::ck_emu::launch_packed({flag}, &{name}, grid, block, args, sizes, nargs); }}")
    return "\n".join(lines) + "\n"


def _cupy_kernels():
    """The CuPy backend's kernel source and name expressions."""
    from convkern.backend import cupy_gpu

    return cupy_gpu.kernel_source(), cupy_gpu.name_expressions()


def _inputs() -> dict:
    """cuda/'s sources by name, and the shared headers they include (the
    geometry, the GPU kernels) by their include path."""
    files = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".cpp") and p.name not in SKIP)
    sources = {p.name: p.read_text() for p in files}
    for p in sorted(SHARED_INCLUDE.rglob("*")):
        if p.suffix in (".h", ".cuh"):
            sources[p.relative_to(SHARED_INCLUDE).as_posix()] = p.read_text()
    return sources


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"


def _pybind_include() -> str:
    try:
        import pybind11
    except ImportError as exc:
        raise EmulatorBuildError(f"pybind11 is not installed ({exc}); pip install pybind11") from exc
    return pybind11.get_include()


def _run(cmd: list) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # no compiler
        raise EmulatorBuildError(f"{cmd[0]}: {exc}") from exc
    if res.returncode:
        raise EmulatorBuildError(f"{' '.join(cmd)}\n{res.stderr[-4000:]}")


def build(build_root: Path, extra_flags=()) -> Path:
    """Compile the emulated module under build_root (reused when its inputs are unchanged)."""
    sources = _inputs()
    cupy_source, cupy_names = _cupy_kernels()
    runtime = {name: (HERE / sub / name).read_text()
               for sub, name in (("", "runtime.cpp"), ("include", "cuda_runtime.h"))}
    flags = FLAGS + list(extra_flags)
    key = hashlib.sha256(repr((sorted(sources.items()), cupy_source, cupy_names, sorted(runtime.items()), flags,
                               _compiler())).encode())
    out_dir = build_root / key.hexdigest()[:16]
    target = out_dir / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    src_dir = out_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    barriers = kernels_with_barriers(sources)
    for name, text in sources.items():
        (src_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (src_dir / name).write_text(rewrite_launches(text, barriers))
    (src_dir / "cupy_kernels_emu.cpp").write_text(cupy_unit(cupy_source, cupy_names, barriers))
    units = [src_dir / n for n in sources if n.endswith((".cu", ".cpp"))]
    units += [src_dir / "cupy_kernels_emu.cpp", HERE / "runtime.cpp"]
    includes = [f"-I{HERE / 'include'}", f"-I{src_dir}", f"-I{_pybind_include()}",
                f"-I{sysconfig.get_paths()['include']}"]

    def compile_one(unit: Path) -> Path:
        obj = out_dir / (unit.stem + ".o")
        _run([_compiler(), "-x", "c++", *flags, *includes, "-c", str(unit), "-o", str(obj)])
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, units))
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    _run([_compiler(), "-shared", *flags, *map(str, objects), "-o", str(tmp)])
    tmp.rename(target)
    return target


def load(build_root: Path):
    """The emulated convkern._cuda module (built if needed; CONVKERN_CUDA_EMU_FLAGS adds
    compiler flags, as tools/sanitize.sh does for the sanitizers)."""
    path = build(build_root, os.environ.get("CONVKERN_CUDA_EMU_FLAGS", "").split())
    loader = importlib.machinery.ExtensionFileLoader("_cuda", str(path))
    spec = importlib.util.spec_from_file_location("_cuda", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
