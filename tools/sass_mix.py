"""The instruction mix of the tiled GEMM's main loop, read from the SASS that
nvcc emits: what can be known about the GEMM's speed on a machine without a
GPU. For each float instantiation of gemm_tiled_kernel (32-bit indices) it
finds the loop with the most FFMAs and counts its instructions. The FFMA share
bounds the fraction of FP32 peak the loop can issue at; it is not a measured
speed.

Needs nvcc, and cuobjdump with nvdisasm (CUDA toolkit, or `pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`: site-packages/nvidia/cu*/bin).
tests/test_sass_mix.py holds every GEMM's share to a floor.

    python3 tools/sass_mix.py [--arch 90] [--source cuda/conv2d_gemm.cu]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

LOADERS = ("WeightRows", "WeightCols", "ImplicitColsT", "ImplicitCols", "DenseRows", "DenseCols",
           "GradOutCols", "GradOutRows")
# what each pair of loaders computes (cuda/conv2d_gemm.cu)
ROLES = {
    "DenseRows+DenseCols": "plain GEMM",
    "WeightRows+DenseCols": "im2col forward",
    "WeightRows+ImplicitCols": "implicit forward",
    "WeightCols+GradOutCols": "grad input (im2col)",
    "GradOutRows+ImplicitColsT": "grad weight (implicit)",
}
DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "cuda", "conv2d_gemm.cu")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def find_cuobjdump() -> str | None:
    """cuobjdump, from PATH or from the nvidia-cuda-cuobjdump wheel (it also
    needs nvdisasm, from PATH or the nvidia-cuda-nvdisasm wheel)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        hits = glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    return None


def main_loop(instrs):
    """The backward branch's body with the most FFMAs: (first, last) indices."""
    at = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    best = None
    for i, (addr, op, args) in enumerate(instrs):
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in at:
            lo = at[int(target.group(1), 16)]
            ffma = sum(1 for _, o, _ in instrs[lo:i + 1] if o.startswith("FFMA"))
            if best is None or ffma > best[0]:
                best = (ffma, lo, i)
    return None if best is None else best[1:]


def kernels(sass: str):
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        kernel = re.search(r"gemm_tiled_kernelIfLi(\d+)ELi(\d+)E", name)
        if not kernel or re.search(r"(ImplicitCols|ImplicitColsT|GradOutCols|GradOutRows)IfxE", name):
            continue  # not float, or the 64-bit index instantiation
        loaders = "+".join(dict.fromkeys(re.findall("|".join(LOADERS), name)))
        instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in INSTR.finditer(block)]
        yield f"{kernel.group(1)}x{kernel.group(2)}", loaders, instrs


def measure(arch: str = "90", source: str = DEFAULT_SOURCE):
    """[(GEMM, tile, instructions, FFMAs, LDS, FFMA share)] of the main loops,
    or None when nvcc or cuobjdump is missing."""
    nvcc, cuobjdump = shutil.which("nvcc"), find_cuobjdump()
    if not nvcc or not cuobjdump:
        return None
    env = dict(os.environ)  # nvdisasm beside cuobjdump (the wheels put them side by side)
    env["PATH"] = os.path.dirname(cuobjdump) + os.pathsep + env.get("PATH", "")
    source = os.path.abspath(source)
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "gemm.o")
        shared = os.path.join(os.path.dirname(os.path.dirname(source)), "convkern", "include")
        subprocess.run([nvcc, "-std=c++17", "-O3", f"-I{os.path.dirname(source)}", f"-I{shared}",
                        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", source, "-o", obj], check=True)
        sass = subprocess.run([cuobjdump, "-sass", obj], check=True, capture_output=True, text=True,
                              env=env).stdout
    rows = []
    for tile, loaders, instrs in kernels(sass):
        span = main_loop(instrs)
        if span is None:
            continue
        count = collections.Counter(op.split(".")[0] for _, op, _ in instrs[span[0]:span[1] + 1])
        total = sum(count.values())
        rows.append((ROLES.get(loaders, loaders), tile, total, count["FFMA"], count["LDS"], count["FFMA"] / total))
    return sorted(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 90 or 80")
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    args = parser.parse_args(argv)
    rows = measure(args.arch, args.source)
    if rows is None:
        print("needs nvcc and cuobjdump + nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
              file=sys.stderr)
        return 2
    print(f"sm_{args.arch}, float, 32-bit indices: the main loop of each tiled GEMM")
    print(f"{'GEMM':<24} {'tile':<8} {'instrs':>7} {'FFMA':>6} {'LDS':>5} {'FFMA share':>11}")
    for role, tile, total, ffma, lds, share in rows:
        print(f"{role:<24} {tile:<8} {total:>7} {ffma:>6} {lds:>5} {share:>11.2f}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
