"""convkern.cached_weights(): a weight's transformed Winograd filters made
once inside a block and reused, with the bits of transforming them in each
call; new filters where the weight is another array, changed in place as
torch counts it, or read at another SIMD level; none kept outside a block;
the kernels refuse filters made for another problem or level."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import convkern
from convkern import layout, tune, weight_cache
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from helpers import SIMD_LEVELS, at_simd_level, randn

pytestmark = pytest.mark.skipif(not cpp.available()[0], reason="the cpp backend is not built here")


def _cl(a):
    return layout.to_channels_last(a)


def _problem(rng, dtype, C=20, K=24, H=9):
    x = _cl(randn(rng, (2, C, H, H + 1), dtype))
    return x, randn(rng, (K, C, 3, 3), dtype), randn(rng, (K,), dtype)


@pytest.mark.parametrize("algo", ["auto", "winograd", "winograd4"])
@pytest.mark.parametrize("weights", ["contiguous", "channels_last"])
def test_kept_filters_give_the_bits_of_fresh_ones(algo, weights, dtype, rng):
    x, w, b = _problem(rng, dtype)
    w = _cl(w) if weights == "channels_last" else w
    with tune.forced("off"):
        want = convkern.conv2d(x, w, b, padding=1, algo=algo)
        want_relu = convkern.conv2d_relu(x, w, b, padding=1, algo=algo)
        with convkern.cached_weights():
            first = convkern.conv2d(x, w, b, padding=1, algo=algo)
            assert weight_cache.kept() == 1
            held = next(iter(weight_cache._active.get().values()))[2]
            again = convkern.conv2d(x, w, b, padding=1, algo=algo)
            relu = convkern.conv2d_relu(x, w, b, padding=1, algo=algo)
            assert weight_cache.kept() == 1 and next(iter(weight_cache._active.get().values()))[2] is held
        assert cpp.last_algo() == ("winograd4" if algo == "winograd4" else "winograd")
    assert weight_cache.kept() == 0
    for got in (first, again):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(relu, want_relu)


def test_another_array_gets_its_own_filters(rng):
    x, w, b = _problem(rng, np.float32)
    w2 = randn(rng, w.shape, np.float32)
    with tune.forced("off"), convkern.cached_weights():
        y1 = convkern.conv2d(x, w, b, padding=1)
        y2 = convkern.conv2d(x, w2, b, padding=1)
        assert weight_cache.kept() == 2
        with convkern.cached_weights():  # nested: the outer block's filters
            np.testing.assert_array_equal(convkern.conv2d(x, w, b, padding=1), y1)
            assert weight_cache.kept() == 2
    with tune.forced("off"):
        np.testing.assert_array_equal(y2, convkern.conv2d(x, w2, b, padding=1))
        assert not np.array_equal(y1, y2)


def test_one_object_keeps_its_filters_between_blocks(rng):
    x, w, b = _problem(rng, np.float32)
    kept = convkern.cached_weights()
    with tune.forced("off"):
        with kept:
            y = convkern.conv2d(x, w, b, padding=1)
        assert len(kept) == 1 and weight_cache.kept() == 0
        held = next(iter(kept._entries.values()))[2]
        with kept:
            np.testing.assert_array_equal(convkern.conv2d(x, w, b, padding=1), y)
        assert len(kept) == 1 and next(iter(kept._entries.values()))[2] is held
        kept.clear()
        assert len(kept) == 0


def test_nothing_is_kept_where_no_winograd_runs(rng):
    """The implicit GEMM, a strided conv, a 1x1 conv and a depthwise conv
    transform nothing; nor does anything outside a block."""
    x, w, b = _problem(rng, np.float32)
    with tune.forced("off"):
        convkern.conv2d(x, w, b, padding=1)
        assert weight_cache.kept() == 0
        with convkern.cached_weights():
            convkern.conv2d(x, w, b, padding=1, algo="im2col")
            convkern.conv2d(x, w, b, padding=1, stride=2)
            convkern.conv2d(x, randn(rng, (8, 20, 1, 1), np.float32))
            convkern.conv2d(x, randn(rng, (20, 1, 3, 3), np.float32), padding=1, groups=20)
            assert weight_cache.kept() == 0


def test_non_finite_weights_with_kept_filters(rng):
    """An inf in the weights: the kept filters hold non-finite values, the
    kernels see it in the outputs and run the implicit GEMM, as uncached."""
    x, w, b = _problem(rng, np.float32)
    w[3, 5, 1, 1] = np.inf
    g = conv2d_geometry(x.shape, w.shape, b.shape, padding=1)
    want = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, algo="im2col")
    assert not np.isfinite(want).all() and np.isfinite(want).any()
    with tune.forced("off"):
        with convkern.cached_weights():
            for _ in range(2):
                got = convkern.conv2d(x, w, b, padding=1, algo="winograd")
                np.testing.assert_array_equal(layout.nhwc(got), want)
                assert cpp.last_algo() == "im2col"


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_each_simd_level_packs_its_own(level, rng):
    """The filters' packing follows the level's GEMM panel width: a level
    changed inside a block gets its own filters, with that level's bits."""
    x, w, b = _problem(rng, np.float32, C=33, K=40)
    with tune.forced("off"), convkern.cached_weights():
        convkern.conv2d(x, w, b, padding=1)
        with at_simd_level(level):
            want = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, conv2d_geometry(x.shape, w.shape, b.shape, padding=1))
            for _ in range(2):
                np.testing.assert_array_equal(layout.nhwc(convkern.conv2d(x, w, b, padding=1)), want)
        assert weight_cache.kept() == (1 if level == convkern.simd_level() else 2)


def test_the_kernels_refuse_filters_made_for_another_call(rng):
    x, w, b = _problem(rng, np.float32)
    g = conv2d_geometry(x.shape, w.shape, b.shape, padding=1)
    u2 = cpp.winograd_nhwc_filters(w, g, 2)
    assert (u2.m, u2.K, u2.C, u2.simd_level) == (2, 24, 20, convkern.simd_level())
    xn = layout.nhwc(x)
    with pytest.raises(ValueError, match=r"F\(2x2\).*winograd=4"):
        cpp.conv2d_forward_nhwc(xn, w, b, g, algo="winograd4", filters=u2)
    g2 = conv2d_geometry(x.shape, w[:8].shape, None, padding=1)
    with pytest.raises(ValueError, match="K=8"):
        cpp.conv2d_forward_nhwc(xn, w[:8], None, g2, algo="winograd", filters=u2)
    with pytest.raises(ValueError, match="another dtype"):
        cpp.conv2d_forward_nhwc(xn.astype(np.float64), w.astype(np.float64), b.astype(np.float64), g,
                                algo="winograd", filters=u2)
    with pytest.raises(ValueError, match="not a 3x3 stride-1"):
        cpp.winograd_nhwc_filters(w, conv2d_geometry(x.shape, w.shape, None, padding=1, stride=2), 2)
    other = [lv for lv in SIMD_LEVELS if lv != convkern.simd_level()]
    with at_simd_level(other[0]):
        with pytest.raises(ValueError, match="SIMD level"):
            cpp.conv2d_forward_nhwc(xn, w, b, g, algo="winograd", filters=u2)


def test_a_block_is_per_thread(rng):
    x, w, b = _problem(rng, np.float32)
    seen = []
    with tune.forced("off"), convkern.cached_weights():
        worker = threading.Thread(target=lambda: seen.append(weight_cache.active()))
        worker.start()
        worker.join()
        assert weight_cache.active()
    assert seen == [False]


def test_torch_in_place_updates_make_new_filters(rng):
    """A torch weight changed in place (as an optimizer step does) has a new
    version: the next call transforms it again and gives the new answer."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: convkern.torch needs it")
    import convkern.torch as ckt

    x, w, b = _problem(rng, np.float32)
    xt = torch.from_numpy(layout.nhwc(x)).permute(0, 3, 1, 2)
    wt, bt = torch.from_numpy(w.copy()), torch.from_numpy(b)
    with torch.no_grad(), tune.forced("off"), ckt.cached_weights():
        before = ckt.conv2d(xt, wt, bt, padding=1)
        wt.mul_(-0.5)
        after = ckt.conv2d(xt, wt, bt, padding=1)
        again = ckt.conv2d(xt, wt, bt, padding=1)
        assert weight_cache.kept() == 1
    want = torch.nn.functional.conv2d(xt.double(), wt.double(), bt.double(), padding=1)
    np.testing.assert_allclose(after.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert torch.equal(after, again) and not torch.allclose(before, after)
