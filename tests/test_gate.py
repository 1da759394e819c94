"""The performance-regression gates pass on the unchanged tree and trip on a
deliberately slowed kernel (CONVKERN_DEBUG_REPEAT runs every kernel n times)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convkern.perf import gate
from convkern.backend import cpp

ROOT = Path(__file__).resolve().parents[1]
CASES = ["relu", "conv2d_im2col_1x1", "max_pool2d_2x2"]


def _needs_valgrind():
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    if not cpp._cpu.build_info().get("callgrind_dumps"):
        pytest.skip("convkern._cpu was built without valgrind's callgrind.h")


def test_instruction_gate_passes_unchanged_and_trips_when_slowed():
    _needs_valgrind()
    base = gate.load_baseline(ROOT / "bench" / "baseline" / "instructions.json")["values"]
    now = gate.count_instructions(CASES)
    verdicts = gate.compare(base, now, 1.03)
    assert not any(v.failed for v in verdicts), gate.report(verdicts, "instructions")[0]
    slowed = gate.count_instructions(CASES, env={"CONVKERN_DEBUG_REPEAT": "2"})
    verdicts = gate.compare(base, slowed, 1.03)
    assert all(v.failed for v in verdicts), gate.report(verdicts, "instructions")[0]
    for name in CASES:  # twice the work, give or take the call's fixed cost
        assert 1.8 < slowed[name] / now[name] < 2.2


def test_wallclock_gate_trips_when_slowed(tmp_path):
    baseline = tmp_path / "wall.json"
    env = dict(os.environ)
    run = [sys.executable, "-m", "convkern", "gate", "--wallclock", "--cases", ",".join(CASES),
           "--baseline", str(baseline), "--rounds", "7"]
    r = subprocess.run(run + ["--update", "--reason", "test"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(baseline.read_text())["history"][-1]["reason"] == "test"
    env["CONVKERN_DEBUG_REPEAT"] = "20"  # every kernel 20x: far beyond the all-cases limit (3x)
    r = subprocess.run(run, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout


def test_wallclock_baselines_are_kept_per_machine_kind(tmp_path):
    """A baseline recorded on another kind of machine (SIMD level, CPU vendor
    and family) is not used: times against NumPy depend on both. Updating
    keeps the other kinds' baselines."""
    baseline = tmp_path / "wall.json"
    other = "scalar OtherVendor family 0"  # no machine this runs on: it must differ from this one's kind
    assert other != gate.machine_kind()
    baseline.write_text(json.dumps({"kind": "wallclock", "by_machine": {other: {"relu": 1e-9}}, "history": []}))
    run = [sys.executable, "-m", "convkern", "gate", "--wallclock", "--cases", "relu", "--baseline", str(baseline),
           "--rounds", "3"]
    r = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"no wall-clock baseline for this machine kind ({gate.machine_kind()})" in r.stdout
    r = subprocess.run(run + ["--update", "--reason", "test"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(baseline.read_text())
    assert set(data["by_machine"]) == {other, gate.machine_kind()}
    assert data["history"][-1]["machine"] == gate.machine_kind()
    # the kind's own baseline is judged: 1e-9 for relu would fail every run
    data["by_machine"][gate.machine_kind()] = {"relu": 1e-9}
    baseline.write_text(json.dumps(data))
    r = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr


def test_updating_some_cases_keeps_the_others(tmp_path):
    path = tmp_path / "b.json"
    gate.save_baseline(path, "instructions", {"relu": 10.0, "max_pool2d_2x2": 20.0}, "first")
    gate.save_baseline(path, "instructions", {"relu": 5.0}, "relu got faster")
    data = json.loads(path.read_text())
    assert data["values"] == {"relu": 5.0, "max_pool2d_2x2": 20.0}
    assert [h["reason"] for h in data["history"]] == ["first", "relu got faster"]
    gate.save_baseline(path, "wallclock", {"relu": 1.0, "max_pool2d_2x2": 2.0}, "first")
    gate.save_baseline(path, "wallclock", {"relu": 0.5}, "relu got faster")
    assert json.loads(path.read_text())["by_machine"][gate.machine_kind()] == {"relu": 0.5, "max_pool2d_2x2": 2.0}


def test_update_needs_a_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convkern", "gate", "--wallclock", "--cases", "relu",
                        "--baseline", str(tmp_path / "b.json"), "--update"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "--reason" in r.stderr


def test_compare_rejects_cases_without_a_baseline():
    with pytest.raises(ValueError, match="no baseline"):
        gate.compare({"a": 1.0}, {"b": 1.0}, 1.03)


def test_wallclock_judges_cases_against_the_machine_state():
    base = {"a": 1.0, "b": 2.0, "c": 4.0}
    drift = {"a": 1.5, "b": 3.0, "c": 6.0}  # the machine got 1.5x slower for everything
    verdicts, state = gate.compare_wallclock(base, drift, 2.0)
    assert state == 1.5 and not any(v.failed for v in verdicts)
    one_slow = {"a": 1.0, "b": 2.0, "c": 10.0}  # one kernel 2.5x slower
    verdicts, _ = gate.compare_wallclock(base, one_slow, 2.0)
    assert [v.failed for v in verdicts] == [False, False, True]
    everything = {"a": 3.5, "b": 7.0, "c": 14.0}  # all 3.5x slower: the median's limit is 3x
    verdicts, _ = gate.compare_wallclock(base, everything, 2.0)
    assert all(v.failed for v in verdicts)
