#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU:
# build for sm_90 only (the quickest build there), the shared suite and
# tests/test_gpu.py on the cuda and cupy backends, then the GPU bench rows
# (each cuda algorithm and cupy against cuDNN with TF32 off; pooling and relu
# against PyTorch on the GPU), then the tiled GEMM in each of its tile shapes
# (tools/gemm_tiles.py). Each step has its own time limit, so one that
# hangs still leaves the others' results. Everything lands under $OUT (or a
# temporary folder); the last lines printed are the summary.
#
#   bash tools/gpu_check.sh
#
# The step limits add up to 560 s, inside the device tool's 600 s a command;
# how long the steps take on a GPU has not been measured yet.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
site="$(mktemp -d)"
out="${OUT:-$site/out}"
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...: runs it with a limit, its output in $out/NAME.txt
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    return $rc
}
cd "$repo"
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DCONVKERN_CUDA=ON" \
    step install 140 python3 -m pip install -q --no-build-isolation --no-deps --target "$site" . \
    || { tail -40 "$out/install.txt"; exit 1; }
# away from the checkout, or its convkern/ (no compiled modules) shadows the installed one
cd "$site"
export PYTHONPATH="$site" CONVKERN_CUDA_EMU=0
step info 20 python3 -m convkern info
step tests 150 python3 -m pytest "$repo/tests" -q -p no:cacheprovider -rfE -k "cuda or cupy or gpu" \
    --junitxml "$out/tests.xml"
gpu="cuda:direct,cuda:im2col,cuda:implicit,cupy:direct,cupy:im2col"
step bench_forward 80 python3 -m convkern bench --ops conv2d --backends "$gpu" --batch 64 \
    --json "$out/bench_forward.json" --no-progress
step bench_backward 80 python3 -m convkern bench --ops conv2d_backward --backends "$gpu" --batch 64 \
    --json "$out/bench_backward.json" --no-progress
step bench_memory 50 python3 -m convkern bench \
    --ops max_pool2d,max_pool2d_backward,avg_pool2d,avg_pool2d_backward,relu,relu_backward \
    --backends cuda,cupy --batch 64 --json "$out/bench_memory.json" --no-progress
# the tiled GEMM in each tile shape, to tune gemm_tile_for (cuda/gemm_tiled.cuh)
step gemm_tiles 40 python3 "$repo/tools/gemm_tiles.py" --reps 10 --json "$out/gemm_tiles.json"
tail -5 "$out/tests.txt"
cat "$out/gemm_tiles.txt"
for f in bench_forward bench_backward bench_memory; do grep -E "cudnn|torch:cuda|cuda|cupy" "$out/$f.txt" | head -60; done
cat "$out/summary.txt"
