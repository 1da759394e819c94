"""The convkern command line: info and verify."""

import subprocess
import sys

import pytest

from convkern import cli


def test_info_reports_simd_threads_backends_and_cuda(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SIMD:" in out and "threads:" in out
    assert "cpp" in out and "reference" in out
    assert "CUDA:" in out


def test_verify_passes_and_prints_a_table(capsys):
    assert cli.main(["verify", "--count", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "conv2d[im2col]" in out and "max_pool2d_backward" in out and "relu" in out
    assert "0 failed" in out


def test_verify_exits_nonzero_on_a_mismatch(monkeypatch, capsys):
    from convkern.backend import cpp

    real = cpp.relu_forward
    monkeypatch.setattr(cpp, "relu_forward", lambda x: real(x) * 1.001)
    assert cli.main(["verify", "--count", "2", "--seed", "1", "--backends", "cpp", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convkern", "info"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "backends:" in r.stdout


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
