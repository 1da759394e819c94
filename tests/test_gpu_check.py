"""tools/gpu_check.sh, the one-command GPU check, run dry on the CPU emulator
(the cuda-emu and cupy-emu backends, tiny sizes, no sm_90 build), so the
script cannot rot between the rare sessions that have a GPU to run it on."""

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

import convkern

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["info", "gputests", "suite", "sanitize", "bench", "tiles", "train"]


def _emulator_or_skip():
    info = {b.name: b for b in convkern.backends()}.get("cuda-emu")
    if info is None:
        pytest.skip("the CUDA emulator is switched off (CONVKERN_CUDA_EMU=0)")
    if not info.available:
        pytest.skip(f"the CUDA emulator is unavailable: {info.reason}")


def _run(tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_dry_run_runs_every_step(tmp_path):
    _emulator_or_skip()
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == STEPS
    assert all("rc=0" in line for line in summary), summary
    assert done.stdout.rstrip().endswith(summary[-1])  # the summary comes last
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"summary.txt", "log.txt", "bench.jsonl", "tiles.json", "tests.xml"} <= set(files)
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert "ceilings" in rows[0] and {r["impl"].split(":")[0] for r in rows[1:]} >= {"cuda-emu", "cupy-emu"}
    suite = ElementTree.parse(tmp_path / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    assert "checks passed" in (tmp_path / "sanitizer.txt").read_text()


def test_only_reruns_the_chosen_steps(tmp_path):
    _emulator_or_skip()
    done = _run(tmp_path, "--only", "tiles,info")
    assert done.returncode == 0, done.stdout[-4000:]
    assert [line.split(":")[0] for line in (tmp_path / "summary.txt").read_text().splitlines()] == ["info", "tiles"]


def test_a_missing_backend_stops_the_run_loudly():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_smoke.py"), "--require", "cuda,no-such-backend"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "no-such-backend is NOT available" in out.stderr
