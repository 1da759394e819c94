#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU (sm_90):
#
#   bash tools/gpu_check.sh                     # every step, most informative first
#   bash tools/gpu_check.sh --only suite,bench  # a rerun: the build, then the chosen steps
#   bash tools/gpu_check.sh --dry-run           # no GPU: every step on the CPU emulator, tiny sizes
#
# Steps and their time limits (seconds; a step killed at its limit still
# leaves what it wrote). The full run's limits add up to 240 s; a rerun of
# up to three steps after the build stays under 150 s.
#
#   install   50  build for sm_90 only (about 40 s on 2 cores without a GPU)
#   info      10  convkern info, then a hard check that the cuda and cupy backends
#                 are available (a missing libcudart, an import error or a CuPy/NumPy
#                 mismatch stops the run here, instead of turning tests into skips)
#   gputests  25  tests/test_gpu.py (determinism, tiles, out-of-memory, torch tensors)
#   suite     55  the shared suite on cuda and cupy, warnings not errors (the image's
#                 NumPy/CuPy may warn), tracebacks of any test over 20 s, slowest 15
#   sanitize  25  small convs/pools/relus with each GEMM tile forced (tools/gpu_smoke.py):
#                 CUDA_LAUNCH_BLOCKING=1, then compute-sanitizer memcheck and racecheck
#   bench     45  forward and backward of every GPU algorithm and cupy against cuDNN
#                 (TF32 off), then pooling and relu; rows stream to bench.jsonl;
#                 a call over 50 ms is reported, not timed
#   tiles     15  the tiled GEMM in each tile shape (tools/gemm_tiles.py)
#   train     15  convkern train --device cuda --epochs 2
#
# Results under $OUT (or a temporary folder), at most 8 files: summary.txt,
# log.txt (every step's output), tests.xml, gpu_tests.xml, sanitizer.txt,
# bench.jsonl, tiles.json. The summary is printed last.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
only="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --only) only=",$2,"; shift 2 ;;
        --only=*) only=",${1#--only=},"; shift ;;
        --dry-run) dry=1; shift ;;
        *) echo "usage: bash tools/gpu_check.sh [--only STEP,...] [--dry-run]" >&2; exit 2 ;;
    esac
done
site="$(mktemp -d)"
out="${OUT:-$site/out}"
mkdir -p "$out"
: >"$out/summary.txt"
failed=0
wanted() { [ -z "$only" ] || [[ "$only" == *",$1,"* ]]; }
step() {  # step NAME SECONDS COMMAND...: runs it with a limit, its output appended to log.txt
    local name="$1" limit="$2"
    shift 2
    wanted "$name" || return 0
    local t0=$SECONDS
    echo "===== $name (limit $limit s): $*" >>"$out/log.txt"
    timeout "$limit" "$@" >>"$out/log.txt" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || failed=1
    local why=""
    [ $rc -eq 124 ] && why=" (killed at its limit)"
    echo "$name: rc=$rc in $((SECONDS - t0)) s$why" | tee -a "$out/summary.txt"
    return $rc
}
finish() {
    echo "----- summary ($([ $dry -eq 1 ] && echo "dry run on the CPU emulator" || echo "GPU"))"
    grep -E "^(=+ .* in [0-9.]+s|[0-9]+ (passed|failed).*)$" "$out/log.txt" | tail -6 || true
    [ -f "$out/bench.jsonl" ] && echo "bench rows: $(($(wc -l <"$out/bench.jsonl") - 1)), failed: $(grep -c -E '"check": "(MISMATCH|ERROR|OVER CAP)' "$out/bench.jsonl")"
    grep -E "^gpu_smoke|^FAIL|^ERROR|ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer.txt" 2>/dev/null | head -12
    grep -E "^test \(.*accuracy" "$out/log.txt" | tail -1
    cat "$out/summary.txt"
    exit $failed
}
cd "$repo"
if [ $dry -eq 1 ]; then
    # the installed convkern and the emulated backends: the script's logic, not a GPU
    ck=(python3 "$repo/tests/cuda_emu/run.py" convkern)
    tool=(python3 "$repo/tests/cuda_emu/run.py")
    cuda=cuda-emu cupy=cupy-emu
    export CONVKERN_CUDA_EMU=1
    cd "$site"  # as below: the checkout's convkern/ has no compiled modules where the package is installed
else
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DCONVKERN_CUDA=ON" \
        step install 50 python3 -m pip install -q --no-build-isolation --no-deps --target "$site" . \
        || { tail -40 "$out/log.txt"; finish; }
    # away from the checkout, or its convkern/ (no compiled modules) shadows the installed one
    cd "$site"
    export PYTHONPATH="$site" CONVKERN_CUDA_EMU=0
    ck=(python3 -m convkern)
    tool=(python3)
    cuda=cuda cupy=cupy
fi
step info 10 bash -c "${ck[*]} info && ${tool[*]} $repo/tools/gpu_smoke.py --require $cuda,$cupy" || finish
pytest_args=(-q -p no:cacheprovider -rfEs -o filterwarnings=default -o faulthandler_timeout=20 --durations=15)
if [ $dry -eq 1 ]; then
    step gputests 25 python3 -m pytest "$repo/tests/test_gpu.py" "${pytest_args[@]}" --junitxml "$out/gpu_tests.xml"
    step suite 55 python3 -m pytest "$repo/tests/test_relu.py" "${pytest_args[@]}" -k "emu" \
        --junitxml "$out/tests.xml"
    smoke=(env CUDA_LAUNCH_BLOCKING=1 "${tool[@]}" "$repo/tools/gpu_smoke.py" --backend "$cuda" --tiles 0,4)
    step sanitize 25 bash -c "${smoke[*]} >$out/sanitizer.txt 2>&1"
    bench_sizes=(--layers mnist_conv1 --batch 1 --min-time 0.01)
    tile_sizes=(--layers mnist_conv1 --batch 1 --reps 1)
    train_args=(--backend "$cuda" --epochs 1 --shapes-train 90)
    # the emulator runs each CUDA thread in turn: a busy 2-core machine took 17 s
    train_limit=40
else
    step gputests 25 python3 -m pytest "$repo/tests/test_gpu.py" "${pytest_args[@]}" --junitxml "$out/gpu_tests.xml"
    step suite 55 python3 -m pytest "$repo/tests" "${pytest_args[@]}" -k "cuda or cupy" --junitxml "$out/tests.xml"
    smoke="$repo/tools/gpu_smoke.py --backend cuda"
    step sanitize 25 bash -c "{ CUDA_LAUNCH_BLOCKING=1 python3 $smoke --tiles 0 \
        && timeout 12 compute-sanitizer --tool memcheck --error-exitcode 1 python3 $smoke --tiles 0,1,4 \
        && timeout 10 compute-sanitizer --tool racecheck --error-exitcode 1 python3 $smoke --tiles 1,4; } \
        >$out/sanitizer.txt 2>&1"
    bench_sizes=(--batch 64 --max-call-ms 50)
    tile_sizes=(--batch 64 --reps 5)
    train_args=(--device cuda --epochs 2)
    train_limit=15
fi
step bench 45 "${ck[@]}" bench --ops conv2d,conv2d_backward,max_pool2d,max_pool2d_backward,avg_pool2d,avg_pool2d_backward,relu,relu_backward \
    --backends "$cuda:direct,$cuda:im2col,$cuda:implicit,$cupy:direct,$cupy:im2col" "${bench_sizes[@]}" \
    --jsonl "$out/bench.jsonl" --no-progress
step tiles 15 "${tool[@]}" "$repo/tools/gemm_tiles.py" --backend "$cuda" "${tile_sizes[@]}" --json "$out/tiles.json"
step train "$train_limit" "${ck[@]}" train "${train_args[@]}" --no-progress --out "$site/run"
finish
