"""The backend registry and selection rules."""

import numpy as np
import pytest

import convkern
from convkern import backend as registry


def test_backends_lists_every_backend_with_a_reason_when_unavailable():
    infos = {b.name: b for b in convkern.backends()}
    assert {"cpp", "numba", "reference", "cupy"} <= set(infos)
    assert infos["reference"].available
    for b in infos.values():
        assert b.available or b.reason, f"{b.name} unavailable without a reason"
        assert b.device in ("cpu", "cuda")


def test_automatic_choice_prefers_compiled_then_numba_then_reference(monkeypatch):
    assert registry.select("cpu").NAME == "cpp"
    from convkern.backend import cpp

    monkeypatch.setattr(cpp, "available", lambda: (False, "simulated"))
    assert registry.select("cpu").NAME == ("numba" if registry.info("numba").available else "reference")


def test_use_backend_and_environment_override(monkeypatch):
    with convkern.use_backend("reference"):
        assert registry.select("cpu").NAME == "reference"
        with convkern.use_backend(None):
            assert registry.select("cpu").NAME == "cpp"
    assert registry.select("cpu").NAME == "cpp"
    monkeypatch.setenv("CONVKERN_BACKEND", "reference")
    assert registry.select("cpu").NAME == "reference"
    # an explicit backend= argument beats both
    assert registry.select("cpu", "cpp").NAME == "cpp"


def test_selection_follows_settings_changed_between_calls(monkeypatch):
    """select keeps its automatic answer per (device, op), but a backend made
    unavailable, one chosen, or CONVKERN_BACKEND set or unset at run time
    holds from the next call, as before anything was kept."""
    from convkern import envvars
    from convkern.backend import cpp

    for _ in range(2):
        assert registry.select("cpu", op="relu_forward") is cpp
    monkeypatch.setattr(cpp, "available", lambda: (False, "simulated"))
    assert registry.select("cpu", op="relu_forward").NAME in ("numba", "reference")
    monkeypatch.undo()
    assert registry.select("cpu", op="relu_forward") is cpp
    monkeypatch.setenv("CONVKERN_BACKEND", "reference")
    assert envvars.get("CONVKERN_BACKEND") == "reference"
    assert registry.select("cpu", op="relu_forward").NAME == "reference"
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    np.testing.assert_array_equal(convkern.relu(x), np.maximum(x, 0))
    monkeypatch.delenv("CONVKERN_BACKEND")
    assert envvars.get("CONVKERN_BACKEND") is None
    assert registry.select("cpu", op="relu_forward") is cpp
    monkeypatch.setenv("CONVKERN_BACKEND", "nonesuch")
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'"):
        convkern.relu(x)


def test_use_backend_rejects_an_unavailable_backend_at_once():
    if registry.info("cupy").available:
        pytest.skip("cupy is available here")
    with pytest.raises(convkern.BackendUnavailableError, match="cupy"):
        with convkern.use_backend("cupy"):
            pass


def test_backend_on_the_wrong_device_is_a_clear_error():
    if not registry.info("cupy").available:
        with pytest.raises(convkern.BackendUnavailableError, match=r"backend 'cupy' is unavailable: .*Available:"):
            convkern.relu(np.ones(3, np.float32), backend="cupy")
    else:
        with pytest.raises(ValueError, match=r"runs on cuda arrays, but the arrays are on cpu"):
            convkern.relu(np.ones(3, np.float32), backend="cupy")


def test_numba_valid_ranges_stay_inside_the_output_row():
    """The numba conv kernels address raw memory without bounds checks and fill
    [0, lo) and [hi, n_out) of each output row around the in-bounds run, in
    parallel over rows: lo > n_out would write into the next row, which another
    thread may own. A 1-wide input under 3 taps of dilation 2 with padding 2
    gives the first tap a first in-bounds output at column 2 of a 1-wide row."""
    numba_cpu = pytest.importorskip("convkern.backend.numba_cpu")
    if not numba_cpu.available()[0]:
        pytest.skip(f"numba unavailable: {numba_cpu.available()[1]}")
    assert numba_cpu._valid(1, 1, 1, -2) == (1, 1)
    rng = np.random.default_rng(0)
    for n_in, n_out, stride, off in rng.integers([1, 1, 1, -20], [9, 9, 5, 20], size=(2000, 4)):
        lo, hi = numba_cpu._valid(n_in, n_out, stride, off)
        assert 0 <= lo <= hi <= n_out
        inside = [o for o in range(n_out) if 0 <= o * stride + off < n_in]
        assert inside == list(range(lo, hi)), (n_in, n_out, stride, off)
