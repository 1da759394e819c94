"""The packed GEMM behind im2col, at sizes around its register tile (MR=12
rows with AVX-512, 6 otherwise; NR=2 vector widths) and cache blocks
(KC=512, MC=144); edge tiles take the smaller-row and one-vector kernels."""

import numpy as np
import pytest

from convkern.backend import cpp
from helpers import assert_close

SIZES = [1, 5, 6, 7, 11, 12, 13, 15, 16, 17, 31, 32, 33, 64, 65]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("m", SIZES)
def test_gemm_tile_edges(rng, dtype, m):
    for n in (m, 1, 33, 97):
        k = int(rng.integers(1, 40))
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        assert_close(cpp.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), dtype, f"{m}x{k}x{n}")


@pytest.mark.parametrize("shape", [(150, 300, 70), (7, 513, 300), (13, 1100, 45), (145, 257, 3100), (290, 129, 97)])
def test_gemm_crosses_cache_blocks(rng, shape):
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    assert_close(cpp.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), np.float32, str(shape))


def test_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="gemm"):
        cpp.gemm(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))
