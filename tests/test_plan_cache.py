"""Plans (convkern.plan_cache): a conv2d or conv2d_backward call's
decisions remembered per signature. A repeated call skips them and gives the same bits; anything its
decisions depended on (tuning mode and choices, backend, threads, SIMD
level, the arrays' strides and dtype, NaN/inf in the weights forward or in
grad_output backward) makes the next call decide again."""

import numpy as np
import pytest

import convkern
from convkern import functional as F
from convkern import layout, plan_cache, tune
from convkern.backend import cpp
from helpers import SIMD_LEVELS, assert_close, at_simd_level, randn

pytestmark = pytest.mark.skipif(not cpp.available()[0], reason="the plans under test are the cpp backend's")


def _spy(monkeypatch, name):
    plan_cache.clear()
    seen = []
    real = getattr(F, name)

    def spy(*args):
        seen.append(args[:3])
        return real(*args)

    monkeypatch.setattr(F, name, spy)
    return seen


@pytest.fixture
def decisions(monkeypatch):
    """Counts the conv2d calls that decide (no plan, or a stale one)."""
    yield _spy(monkeypatch, "_conv2d_plan")
    plan_cache.clear()


@pytest.fixture
def backward_decisions(monkeypatch):
    """Counts the conv2d_backward calls that decide."""
    yield _spy(monkeypatch, "_conv2d_backward_plan")
    plan_cache.clear()


def _cl(a):
    return layout.to_channels_last(a)


CASES = [((2, 8, 9, 9), (12, 8, 3, 3), dict(padding=1)),           # Winograd / GEMM
         ((2, 16, 4, 4), (40, 16, 1, 1), {}),                       # 1x1 on few pixels
         ((3, 6, 11, 7), (6, 1, 3, 3), dict(padding=1, groups=6)),  # depthwise, padded
         ((6, 10, 10), (4, 6, 5, 5), dict(stride=2, padding=2))]     # unbatched, strided


@pytest.mark.parametrize("case,layout_of", [(c, "nchw") for c in CASES] + [(c, "channels_last") for c in CASES[:3]],
                         ids=lambda v: "x".join(map(str, v[0])) if isinstance(v, tuple) else v)
def test_a_repeated_call_skips_deciding_and_gives_the_same_bits(case, layout_of, decisions, rng):
    xs, ws, kw = case
    x, w, b = randn(rng, xs, np.float32), randn(rng, ws, np.float32), randn(rng, (ws[0],), np.float32)
    if layout_of == "channels_last":  # (batched cases only: an unbatched input has no such layout)
        x = _cl(x)
    with tune.forced("off"):
        first = convkern.conv2d(x, w, b, **kw)
        n = len(decisions)
        x2, w2 = x.copy(order="K"), w + 1  # other arrays, same signature: the plan serves them
        again, other = convkern.conv2d(x, w, b, **kw), convkern.conv2d(x2, w2, b, **kw)
        assert len(decisions) == n, "a repeated signature decided again"
        np.testing.assert_array_equal(again, first)
        assert again.strides == first.strides
        plan_cache.clear()
        np.testing.assert_array_equal(other, convkern.conv2d(x2, w2, b, **kw))  # as if decided afresh
    want = convkern.conv2d(x2.astype(np.float64), w2.astype(np.float64), b.astype(np.float64), **kw,
                           backend="reference")
    assert_close(other, want, np.float32, f"x{xs} w{ws} {kw}")


def test_what_the_decisions_depend_on_makes_them_again(decisions, rng):
    x, w = randn(rng, (2, 8, 9, 9), np.float32), randn(rng, (12, 8, 3, 3), np.float32)
    with tune.forced("off"):
        convkern.conv2d(x, w, padding=1)
        n = len(decisions)
        for change in (lambda: convkern.conv2d(_cl(x), w, padding=1),              # strides
                       lambda: convkern.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1),
                       lambda: convkern.conv2d(x, w, padding=(1, 1)),             # arguments
                       lambda: convkern.conv2d(x, w, padding=1, backend="reference")):
            change()
            assert len(decisions) == n + 1, "a new signature must decide"
            n += 1
        with tune.forced("recall"):  # the tuning mode
            convkern.conv2d(x, w, padding=1)
        assert len(decisions) == n + 1
    with tune.forced("off"), convkern.use_backend("reference"):  # the backend selected
        convkern.conv2d(x, w, padding=1)
    assert len(decisions) == n + 2
    before = convkern.get_num_threads()
    with tune.forced("off"):
        try:
            convkern.set_num_threads(1 if before != 1 else 2)
            convkern.conv2d(x, w, padding=1)
        finally:
            convkern.set_num_threads(before)
        assert len(decisions) == n + 3
        levels = [lv for lv in SIMD_LEVELS if lv != convkern.simd_level()]
        with at_simd_level(levels[0]):
            convkern.conv2d(x, w, padding=1)
        assert len(decisions) == n + 4
        with convkern.cached_weights():
            convkern.conv2d(x, w, padding=1)
        assert len(decisions) == n + 5


def test_new_tuning_choices_make_the_decisions_again(decisions, rng, tmp_path, monkeypatch):
    """A plan made from the choices held is dropped when they change
    (forgotten, adopted, measured), and a recalled choice counts as
    remembered each time the plan serves it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CONVKERN_TUNE", "on")
    tune.forget()
    x, w = randn(rng, (2, 16, 12, 12), np.float32), randn(rng, (16, 16, 3, 3), np.float32)
    try:
        convkern.conv2d(x, w, padding=1)  # measures: no plan kept
        convkern.conv2d(x, w, padding=1)  # recalls: the plan is made
        n, remembered = len(decisions), tune._stats["remembered"]
        convkern.conv2d(x, w, padding=1)
        assert len(decisions) == n and tune._stats["remembered"] > remembered
        tune.adopt({})
        convkern.conv2d(x, w, padding=1)
        assert len(decisions) == n + 1
    finally:
        tune.forget()


def test_nan_weights_after_a_plan_get_torch_semantics(decisions, rng):
    """A padded depthwise conv whose weights were finite when planned runs
    kernels that skip the padding taps; NaN weights then must still give
    NaN wherever a NaN weight meets padding (0 * NaN), as PyTorch does."""
    x, w = randn(rng, (2, 6, 7, 7), np.float32), randn(rng, (6, 1, 3, 3), np.float32)
    for xin in (x, _cl(x)):
        with tune.forced("off"):
            convkern.conv2d(xin, w, padding=1, groups=6)
            bad = w.copy()
            bad[2, 0, 0, 0] = np.nan
            got = convkern.conv2d(xin, bad, padding=1, groups=6)
        want = convkern.conv2d(x.astype(np.float64), bad.astype(np.float64), padding=1, groups=6,
                               backend="reference")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[:, 2]).all() and not np.isnan(got[:, 3]).any()


NEEDS = [(True, True, True), (True, False, False), (False, True, True)]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("xwb"[i] for i in range(3) if n[i]))
@pytest.mark.parametrize("case,layout_of", [(c, "nchw") for c in CASES] + [(c, "channels_last") for c in CASES[:3]],
                         ids=lambda v: "x".join(map(str, v[0])) if isinstance(v, tuple) else v)
def test_a_repeated_backward_skips_deciding_and_gives_the_same_bits(case, layout_of, needs, backward_decisions,
                                                                     rng):
    xs, ws, kw = case
    x, w = randn(rng, xs, np.float32), randn(rng, ws, np.float32)
    gy = randn(rng, convkern.conv2d(x, w, **kw).shape, np.float32)
    if layout_of == "channels_last":
        x, gy = _cl(x), _cl(gy)
    with tune.forced("off"):
        first = convkern.conv2d_backward(gy, x, w, **kw, needs=needs)
        n = len(backward_decisions)
        gy2, x2, w2 = gy * 2, x.copy(order="K") - 1, w + 1  # other arrays, same signature
        again = convkern.conv2d_backward(gy, x, w, **kw, needs=needs)
        other = convkern.conv2d_backward(gy2, x2, w2, **kw, needs=needs)
        assert len(backward_decisions) == n, "a repeated signature decided again"
        for a, b in zip(again, first):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
                assert a.strides == b.strides
        plan_cache.clear()
        fresh = convkern.conv2d_backward(gy2, x2, w2, **kw, needs=needs)
    want = convkern.conv2d_backward(gy2.astype(np.float64), x2.astype(np.float64), w2.astype(np.float64), **kw,
                                    needs=needs, backend="reference")
    for name, got, again_fresh, ref in zip("xwb", other, fresh, want):
        assert (got is None) == (ref is None), name
        if got is not None:
            np.testing.assert_array_equal(got, again_fresh)  # as if decided afresh
            assert_close(got, ref, np.float32, f"grad {name}: x{xs} w{ws} {kw} needs {needs}")


def test_what_backward_decisions_depend_on_makes_them_again(backward_decisions, rng):
    x, w = randn(rng, (2, 8, 9, 9), np.float32), randn(rng, (12, 8, 3, 3), np.float32)
    gy = randn(rng, (2, 12, 9, 9), np.float32)
    with tune.forced("off"):
        convkern.conv2d_backward(gy, x, w, padding=1)
        n = len(backward_decisions)
        for change in (lambda: convkern.conv2d_backward(_cl(gy), _cl(x), w, padding=1),   # strides
                       lambda: convkern.conv2d_backward(gy, x, w, padding=1, needs=(True, False, False)),
                       lambda: convkern.conv2d_backward(gy, x, _cl(w), padding=1),        # weights' layout
                       lambda: convkern.conv2d_backward(gy, x, w, padding=1, backend="reference")):
            change()
            assert len(backward_decisions) == n + 1, "a new signature must decide"
            n += 1
        with tune.forced("recall"):
            convkern.conv2d_backward(gy, x, w, padding=1)
        assert len(backward_decisions) == n + 1


def test_nan_grad_output_after_a_backward_plan_gets_torch_semantics(backward_decisions, rng):
    """A padded depthwise weight gradient planned on a finite grad_output
    runs kernels that skip the padding taps; a NaN in a later grad_output
    must still reach every tap of its channel's weight gradient (it meets
    the padding's zeros, 0 * NaN), as PyTorch's does."""
    x, w = randn(rng, (2, 6, 7, 7), np.float32), randn(rng, (6, 1, 3, 3), np.float32)
    gy = randn(rng, (2, 6, 7, 7), np.float32)
    bad = gy.copy()
    bad[1, 2, 0, 0] = np.nan
    for cl in (False, True):
        args = (_cl(gy), _cl(x)) if cl else (gy, x)
        with tune.forced("off"):
            convkern.conv2d_backward(*args, w, padding=1, groups=6)
            n = len(backward_decisions)
            gw = convkern.conv2d_backward(_cl(bad) if cl else bad, args[1], w, padding=1, groups=6)[1]
            assert len(backward_decisions) > n, "a NaN grad_output must take the full road"
        want = convkern.conv2d_backward(bad.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                        padding=1, groups=6, backend="reference")[1]
        np.testing.assert_array_equal(np.isnan(gw), np.isnan(want))
        assert np.isnan(gw[2]).all() and not np.isnan(gw[3]).any()
