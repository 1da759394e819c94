"""The packed GEMM behind im2col, at sizes around its register tile (MR=12
rows with AVX-512, 6 otherwise; NR=2 vector widths) and its cache blocks
(KC, MC, NC, derived from this machine's caches or forced by
CONVKERN_GEMM_BLOCKING); edge tiles take the smaller-row and one-vector
kernels."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convkern
from convkern.backend import cpp
from helpers import assert_close, at_thread_counts, run_python

BLOCKING = cpp._cpu.build_info()["gemm_blocking_f32"]

SIZES = [1, 5, 6, 7, 11, 12, 13, 15, 16, 17, 31, 32, 33, 64, 65]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("m", SIZES)
def test_gemm_tile_edges(rng, dtype, m):
    for n in (m, 1, 33, 97):
        k = int(rng.integers(1, 40))
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        assert_close(cpp.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), dtype, f"{m}x{k}x{n}")


def _block_shapes():
    kc, mc, nc = BLOCKING["KC"], BLOCKING["MC"], BLOCKING["NC"]
    return [(mc + 6, kc + 44, 70), (7, kc + 1, 300), (13, 2 * kc + 76, 45), (mc + 1, kc + 1, nc + 5),
            (2 * mc + 2, kc // 2 + 1, 97)]


@pytest.mark.parametrize("which", range(5))
def test_gemm_crosses_cache_blocks(rng, which):
    m, k, n = shape = _block_shapes()[which]
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    assert_close(cpp.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64), np.float32, str(shape))


# rows only (each thread packs all of B), columns only, a grid of both, a
# single row or column, blocks of uneven size, and K past one block
SPLIT_SHAPES = [(517, 37, 21), (7, 45, 700), (300, 29, 300), (1, 5, 1000), (1000, 5, 1), (64, 700, 97),
                (130, 700, 40), (12, 700, 500)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_threads_share_the_gemm_without_changing_bits(rng, dtype):
    """Each thread owns a block of C (rows, columns or a grid of both, as a
    cost model picks) and packs what it reads; every element still sums over
    K in the same order, so the bits match at any thread count (3 and 4
    oversubscribe a 2-core machine: the split is the same)."""
    for m, k, n in SPLIT_SHAPES:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        outs = at_thread_counts(lambda: cpp.gemm(a, b), (1, 2, 3, 4))
        assert_close(outs[0], a.astype(np.float64) @ b.astype(np.float64), dtype, f"{m}x{k}x{n}")
        for nt, out in zip((2, 3, 4), outs[1:]):
            np.testing.assert_array_equal(out, outs[0], err_msg=f"{m}x{k}x{n} at {nt} threads")


@pytest.mark.parametrize("channels,size", [(130, 3), (64, 17)], ids=["rows", "columns"])
def test_threads_share_a_gemm_of_packed_weights(rng, channels, size):
    """One image: im2col's GEMM runs on all threads with the weights packed
    once beforehand, each thread reading its rows of them in place."""
    x = rng.standard_normal((1, 5, size, size + 2)).astype(np.float32)
    w = rng.standard_normal((channels, 5, 3, 3)).astype(np.float32)
    outs = at_thread_counts(lambda: convkern.conv2d(x, w, padding=1, algo="im2col", backend="cpp"),
                            (1, 2, 3, 4))
    ref = convkern.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="reference")
    assert_close(outs[0], ref, np.float32, f"{channels} channels")
    for nt, out in zip((2, 3, 4), outs[1:]):
        np.testing.assert_array_equal(out, outs[0], err_msg=f"{channels} channels at {nt} threads")


def test_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="gemm"):
        cpp.gemm(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))


FORCED_BLOCKING_CHECK = """
    import json
    import numpy as np
    import convkern.functional as F
    from convkern.backend import cpp

    rng = np.random.default_rng(3)
    errors = {}
    for m, k, n in [(37, 50, 97), (25, 17, 130), (12, 16, 64), (50, 129, 31)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        errors[f"gemm {m}x{k}x{n}"] = float(np.linalg.norm(cpp.gemm(a, b) - ref) / np.linalg.norm(ref))
    x = rng.standard_normal((2, 19, 11, 13)).astype(np.float32)
    w = rng.standard_normal((29, 19, 3, 3)).astype(np.float32)
    ref = F.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, backend="reference")
    cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for name, inp, algo in [("im2col", x, "im2col"), ("shifted", x, "shifted"), ("winograd", x, "winograd"),
                            ("winograd4", x, "winograd4"), ("channels_last", cl, "auto")]:
        y = F.conv2d(inp, w, padding=1, backend="cpp", algo=algo)
        errors[f"conv {name}"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    print(json.dumps({"errors": errors, "blocking": cpp._cpu.build_info()["gemm_blocking_f32"]}))
"""


FEW_ROWS_CHECK = """
    import json
    import numpy as np
    import convkern
    from convkern.backend import cpp

    rng = np.random.default_rng(5)
    results = {}
    for m, k, n in [(7, 300, 700), (40, 97, 333), (150, 20, 400)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        outs = []
        for nt in (1, 2):
            convkern.set_num_threads(nt)
            outs.append(cpp.gemm(a, b))
        err = float(np.linalg.norm(outs[0] - ref) / np.linalg.norm(ref))
        results[f"{m}x{k}x{n}"] = [err, bool(np.array_equal(outs[0], outs[1]))]
    info = cpp._cpu.build_info()
    print(json.dumps({"results": results, "blocking": info["gemm_blocking_f32"]}))
"""


def test_few_rows_pack_b_in_blocks_that_fit_half_of_l2(tmp_path):
    """With few rows of A (at most 12 panels) B is packed in blocks that fit
    half of L2; a 64 KiB L2 makes them a panel or two wide, so these GEMMs
    cross many (150 rows: the ordinary blocks). Same products, same bits at
    one and two threads."""
    out = run_python(FEW_ROWS_CHECK, tmp_path, CONVKERN_CACHES="32K/8,64K/8,8M/16")
    b = out["blocking"]
    cap = max(b["NR"], (64 << 10) // 2 // (b["KC"] * 4) // b["NR"] * b["NR"])
    assert cap < 333, (cap, b)
    bad = {shape: r for shape, r in out["results"].items() if not (r[0] < 2e-6 and r[1])}
    assert not bad, bad


@pytest.mark.parametrize("blocking", ["16,24,64", "24,30,70", "8,12,32"])
def test_forced_blocking_gives_the_same_products(tmp_path, blocking):
    """Blocks far smaller than any derived ones: every GEMM and conv path then
    crosses many KC, MC and NC boundaries (MC and NC rounded to whole panels)."""
    out = run_python(FORCED_BLOCKING_CHECK, tmp_path, CONVKERN_GEMM_BLOCKING=blocking)
    kc, mc, nc = (int(v) for v in blocking.split(","))
    b = out["blocking"]
    assert (b["KC"], b["source"]) == (kc, "CONVKERN_GEMM_BLOCKING")
    assert b["MC"] == max(b["MR"], mc // b["MR"] * b["MR"]) and b["NC"] == max(b["NR"], nc // b["NR"] * b["NR"])
    # F(4x4) Winograd's transforms scale by up to 8: its float32 rounding is a few times the others'
    bad = {k: v for k, v in out["errors"].items() if not v < (5e-6 if "winograd4" in k else 2e-6)}
    assert not bad, bad


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_c_blocks_split_a_into_row_blocks_without_changing_a_bit(tmp_path, threads):
    """Where C is wide, the A block takes fewer rows so that it and its C
    tiles fit L2 together. Under a 256 KiB L2 (the same L1 and L3, so the
    same KC and NC) the rows of these GEMMs go in blocks of 8 register panels,
    several per thread with a partial last one; the result must match the
    reference and the one-block run bit for bit (row blocks do not reorder
    any sum)."""
    code = """
        import numpy as np
        from convkern.backend import cpp
        rng = np.random.default_rng(7)
        out = []
        for m, k, n in ((301, 700, 1500), (97, 530, 2100)):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            c = cpp.gemm(a, b)
            ref = a.astype(np.float64) @ b.astype(np.float64)
            out.append([float(np.abs(c - ref).max() / np.abs(ref).max()), hashlib.sha256(c.tobytes()).hexdigest()])
        print(json.dumps(out))
    """.replace("import numpy", "import hashlib, json, numpy")
    runs = {l2: run_python(code, tmp_path, CONVKERN_CACHES=f"48K/12,{l2},64M/16", OMP_NUM_THREADS=str(threads))
            for l2 in ("256K/16", "8M/16")}
    for (err_small, small), (err_big, big) in zip(runs["256K/16"], runs["8M/16"]):
        assert err_small < 1e-5 and err_big < 1e-5
        assert small == big


def test_blocking_follows_the_caches(tmp_path):
    """CONVKERN_CACHES stands in for another machine's caches: the blocking
    derived from them is what the kernels use and what info reports."""
    code = """
        import json
        from convkern.backend import cpp
        bi = cpp._cpu.build_info()
        print(json.dumps({"caches": bi["caches"], "blocking": bi["gemm_blocking_f32"]}))
    """
    small = run_python(code, tmp_path, CONVKERN_CACHES="32K/8,512K/8,8M/16")
    big = run_python(code, tmp_path, CONVKERN_CACHES="48k/12,2M/16,100M/16")
    assert small["caches"]["l1d"] == 32 << 10 and small["caches"]["ways"] == [8, 8, 16]
    assert small["caches"]["source"] == "CONVKERN_CACHES" and big["caches"]["l2"] == 2 << 20
    for run, (l1, ways, l2) in ((small, (32 << 10, 8, 512 << 10)), (big, (48 << 10, 12, 2 << 20))):
        assert run["blocking"]["source"] == "caches"
        expect = cpp._cpu.gemm_blocking_for(l1, l2, 1 << 30, ways, 16)
        assert {k: run["blocking"][k] for k in ("KC", "MC", "rows_KC")} == \
            {k: expect[k] for k in ("KC", "MC", "rows_KC")}
    assert small["blocking"]["KC"] < big["blocking"]["KC"] and small["blocking"]["MC"] < big["blocking"]["MC"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("l1,ways", [(32 << 10, 8), (48 << 10, 12), (64 << 10, 4), (80 << 10, 20)])
def test_derived_kc_fills_l1_ways_with_one_to_spare(dtype, l1, ways):
    """The A (MR x KC) and B (KC x NR) micro-panels take whole ways of L1, at
    most all but one, and KC is the largest multiple of 16 for which they do,
    up to 1024 (narrow SSE panels in a large L1 would allow more)."""
    b = cpp._cpu.gemm_blocking_for(l1, 1 << 20, 32 << 20, ways, 16, dtype=dtype)
    size, way = np.dtype(dtype).itemsize, l1 // ways

    def ways_used(kc):
        return -(-b["MR"] * kc * size // way) + -(-b["NR"] * kc * size // way)

    assert b["KC"] % 16 == 0 and ways_used(b["KC"]) <= ways - 1
    assert b["KC"] in (64, 1024) or ways_used(b["KC"] + 16) > ways - 1
    # the A block in half of L2, the B block in half of L3 (at most 4 MiB), whole panels
    assert b["MC"] % b["MR"] == 0 and b["MC"] * b["KC"] * size <= (1 << 20) // 2
    assert (b["MC"] + b["MR"]) * b["KC"] * size > (1 << 20) // 2
    assert b["NC"] % b["NR"] == 0 and b["NC"] * b["KC"] * size <= 4 << 20


@pytest.mark.parametrize("var,value", [("CONVKERN_GEMM_BLOCKING", "1,2"), ("CONVKERN_GEMM_BLOCKING", "64,x,9"),
                                       ("CONVKERN_CACHES", "48K,1M"), ("CONVKERN_CACHES", "48K/0,1M,2M")])
def test_malformed_blocking_settings_name_the_variable(tmp_path, var, value):
    """The compiled module refuses to load (no kernel runs with a half-read
    setting) and every use of the cpp backend says why."""
    code = """
        import convkern
        try:
            convkern.simd_level()
        except convkern.BackendUnavailableError as exc:
            print("refused:", exc)
        else:
            print("ran")
    """
    full = dict(os.environ, **{var: value})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("refused:") and f"{var}" in r.stdout and f"'{value}'" in r.stdout, r.stdout
    assert "reinstall" not in r.stdout
