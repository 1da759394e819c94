"""Runs a convkern command or a tool script with the emulated GPU backends
registered, so GPU tooling can be exercised on a machine without a GPU:

    python3 tests/cuda_emu/run.py convkern bench --backends cuda-emu ...
    python3 tests/cuda_emu/run.py tools/gpu_smoke.py --backend cuda-emu

(tools/gpu_check.sh --dry-run does this for every step.)"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_emu.register import register  # noqa: E402


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    register()
    target, args = sys.argv[1], sys.argv[2:]
    if target == "convkern":
        from convkern.cli import main as convkern_main

        return int(convkern_main(args) or 0)
    sys.argv = [target] + args
    runpy.run_path(target, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
