"""convkern.keep_freed_memory: with it, glibc keeps freed blocks for the next
arrays instead of returning them to the OS, so a loop of ops stops faulting
its outputs in page by page (counted, not timed)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

LOOP = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import convkern as ck
    from convkern import nn

    if sys.argv[1] == "keep":
        assert ck.keep_freed_memory()
    model = nn.build("lenet", (1, 28, 28), 10, rng=0).eval()
    model[0].algo = model[3].algo = "shifted"  # its workspace shifted glibc's trimming onto the outputs
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)

    def run(y):  # module by module: each ReLU makes its own output (Sequential would fuse it into the conv)
        for m in model:
            y = m(y)
        return y

    for _ in range(3):
        run(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        run(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc only")
def test_keeping_freed_memory_stops_the_page_faults(tmp_path):
    faults = {}
    for mode in ("keep", "default"):
        p = subprocess.run([sys.executable, "-c", LOOP, mode], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={"CONVKERN_TUNE": "off", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert p.returncode == 0, p.stderr
        faults[mode] = int(p.stdout.split()[-1])
    # 20 forward passes allocate ~20 x 15 MB of outputs; kept memory serves them
    assert faults["keep"] * 4 < faults["default"], faults


def test_keep_freed_memory_answers_a_bool():
    import convkern

    assert isinstance(convkern.keep_freed_memory(), bool)
