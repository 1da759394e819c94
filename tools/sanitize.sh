#!/usr/bin/env bash
# Build convkern._cpu with AddressSanitizer + UndefinedBehaviorSanitizer in a
# scratch venv and run the tests that exercise the C++ kernels under it; the
# CUDA emulator's build of the GPU kernels (tests/cuda_emu: backends cuda-emu
# and cupy-emu) is sanitized too, so its shared-memory arrays are checked.
# Any finding aborts the run (non-zero exit). Leak detection is off: CPython
# and NumPy keep allocations alive to exit by design; `tests/test_hardening.py`
# checks our own memory behaviour instead.
#
#   bash tools/sanitize.sh [pytest paths and options; default: tests]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
CONVKERN_SANITIZE=ON CONVKERN_CUDA=OFF pip install -q --config-settings=build-dir=build/sanitize '.[test]'
# an ASan-instrumented module loads only with the ASan runtime first in line
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# reports go to files: pytest captures the test process's stderr, and an aborted
# process would take a report written there with it
logs="$(dirname "$venv")/sanitizer"
# allocator_may_return_null: an impossible allocation must become MemoryError (a tested path)
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$logs"
export CONVKERN_CUDA_EMU_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs"
# a finding fails the run; the warning an impossible allocation leaves does not
trap 'status=$?; if ls "$logs".* >/dev/null 2>&1; then cat "$logs".*
      if grep -qE "ERROR: AddressSanitizer|runtime error" "$logs".*; then status=1; fi; fi; exit $status' EXIT
# from outside the source tree, so the installed (sanitized) package is the one imported
(cd "$(dirname "$venv")" && python -c "import convkern.backend.cpp as c, sys
sys.exit(0 if c._cpu is not None and c._cpu.build_info()['sanitized'] else f'not a sanitized build: {c._IMPORT_ERROR}')")
# the gates count instructions and time the normal build: not this one; test_sass_mix
# runs nvcc, none of our C++ (and nvcc crashes with the sanitizers preloaded)
pytest -q -p no:cacheprovider -x -k "not numba and (not cupy or cupy-emu)" --ignore=tests/test_gate.py \
    --ignore=tests/test_sass_mix.py "${@:-tests}"
