"""convkern.distributed: the sampler, the bucketed gradient averaging, the
communication model, and whole jobs under mpiexec with 2 ranks on this
machine (equivalence with one process, resume, failure, hang, disagreement,
shared tuning)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convkern import distributed as dist, nn

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def _mpiexec():
    """The mpiexec next to this Python (the distributed extra's MPICH), else on PATH."""
    here = Path(sys.executable).with_name("mpiexec")
    return str(here) if here.exists() else shutil.which("mpiexec")


def _have_mpi() -> str:
    try:
        importlib.import_module("mpi4py")
    except ImportError:
        return "mpi4py is not installed (pip install 'convkern[distributed]')"
    if _mpiexec() is None:
        return "no mpiexec (pip install mpich, or a system MPI)"
    return ""


needs_mpi = pytest.mark.skipif(bool(_have_mpi()), reason=_have_mpi() or "mpi present")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("PMI_RANK", None)
    return env


def mpirun(tmp_path, n, *args, timeout=120, env=None, mpmd=None):
    """Run `python dist_worker.py args` (or `python -m convkern args` when
    args start with "-m") on n ranks; cwd away from the checkout."""
    cmd = [_mpiexec(), "-n", str(n), sys.executable, *args]
    if mpmd is not None:
        cmd = [_mpiexec()] + [c for i, part in enumerate(mpmd) for c in ([":"] if i else []) + part]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


# -- the sampler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ranks,drop_last", [(10, 1, False), (10, 3, False), (10, 3, True), (7, 7, False),
                                               (100, 4, True), (101, 4, False), (5, 2, True)])
def test_sampler_shards_cover_the_global_order(n, ranks, drop_last):
    shards = [dist.DistributedSampler(n, ranks, r, seed=9, drop_last=drop_last) for r in range(ranks)]
    for s in shards:
        s.set_epoch(4)
    assert len({len(s) for s in shards}) == 1, "ranks must take equal counts"
    order = np.random.default_rng([9, 4]).permutation(n)
    interleaved = np.stack([s.indices() for s in shards], axis=1).reshape(-1)
    if drop_last:
        assert np.array_equal(interleaved, order[:len(interleaved)]) and n - len(interleaved) < ranks
    else:
        assert np.array_equal(interleaved[:n], order)
        assert np.array_equal(interleaved[n:], order[:len(interleaved) - n])  # padded by repetition


def test_sampler_order_depends_on_seed_and_epoch_only():
    one = dist.DistributedSampler(64, 1, 0, seed=2)
    two = [dist.DistributedSampler(64, 2, r, seed=2) for r in range(2)]
    for e in (0, 1, 5):
        one.set_epoch(e)
        for s in two:
            s.set_epoch(e)
        assert np.array_equal(one.global_order(), two[1].global_order())
        # 2 ranks x batch 8 step through the same global batches as 1 rank x batch 16
        for k in range(4):
            union = np.sort(np.concatenate([s.indices()[8 * k:8 * k + 8] for s in two]))
            assert np.array_equal(union, np.sort(one.indices()[16 * k:16 * k + 16]))
    one.set_epoch(1)
    first = one.indices().copy()
    one.set_epoch(2)
    assert not np.array_equal(first, one.indices())


def test_sampler_matches_torch_distributed_sampler_without_shuffle():
    torch = pytest.importorskip("torch", reason="torch is the reference for the sharding rules")
    from torch.utils.data import DistributedSampler as TorchSampler

    for n, ranks, drop_last in [(10, 3, False), (10, 3, True), (11, 4, False), (13, 2, True), (8, 8, False)]:
        data = torch.arange(n)
        for r in range(ranks):
            want = list(TorchSampler(data, num_replicas=ranks, rank=r, shuffle=False, drop_last=drop_last))
            got = list(dist.DistributedSampler(n, ranks, r, shuffle=False, drop_last=drop_last))
            assert got == want, (n, ranks, r, drop_last)


def test_sampler_refuses_more_ranks_than_samples_and_bad_ranks():
    with pytest.raises(ValueError, match="4 ranks but only 3 samples"):
        dist.DistributedSampler(3, 4, 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        dist.DistributedSampler(10, 2, 2)


# -- DataParallel in one process ------------------------------------------------------------------

def test_buckets_are_fixed_reverse_ordered_and_bounded():
    model = nn.build("vgg", (1, 16, 16), 3, rng=0, width=8)
    dp = dist.DataParallel(model, dist.LocalComm(), bucket_mb=0.01)
    sizes = [int(np.prod(p.shape)) for p in model.parameters()]
    assert sum(dp.bucket_sizes) == sum(sizes)
    limit = int(0.01 * (1 << 20)) // 4
    flat = [p for b in dp._buckets for p in b.params]
    assert flat == list(reversed(model.parameters()))
    for b in dp._buckets:  # a bucket over the limit holds one parameter bigger than the limit
        assert b.offsets[-1] <= limit or len(b.params) == 1
    assert len(dist.DataParallel(model, dist.LocalComm()).bucket_sizes) == 1


def test_data_parallel_on_one_process_is_the_module():
    rng = np.random.default_rng(0)
    model = nn.build("lenet", (1, 16, 16), 3, rng=0, dropout=0.0, dtype=np.float64)
    dp = dist.DataParallel(model, dist.LocalComm())
    x, y = rng.standard_normal((5, 1, 16, 16)), np.array([0, 1, 2, 1, 0])
    crit = nn.CrossEntropyLoss()
    crit(dp(x), y)
    g = dp.backward(crit.backward())
    assert g.shape == x.shape and all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="convkern.nn.Module"):
        dist.DataParallel(object())


def test_gradient_averaging_is_the_mean_over_fake_ranks():
    """The bucket packing and scaling, with a comm that sums as 3 ranks holding the same gradients would."""

    class ThreeRanks(dist.LocalComm):
        size = 3

        def iallreduce_(self, buf):
            buf *= 3
            return None

        def allgather_obj(self, obj, what=""):
            return [obj] * 3

        def bcast_(self, buf, root=0, what=""):
            return buf

    model = nn.build("lenet", (1, 16, 16), 3, rng=1, dropout=0.0, dtype=np.float64)
    dp = dist.DataParallel(model, ThreeRanks(), bucket_mb=0.05)
    assert len(dp.bucket_sizes) > 2
    rng = np.random.default_rng(2)
    for p in model.parameters():
        p.grad = rng.standard_normal(p.shape)
    want = [p.grad.copy() for p in model.parameters()]
    model.parameters()[0].grad = None  # counts as zeros
    want[0] = np.zeros_like(want[0])
    dp.allreduce_gradients()
    for p, w in zip(model.parameters(), want):
        np.testing.assert_allclose(p.grad, w, rtol=1e-15, atol=0)


# -- the communication model ---------------------------------------------------------------------

def test_ring_allreduce_model():
    assert dist.ring_allreduce_seconds(1e6, 1, 1e9, 1e-6) == 0.0
    # 2 ranks: 2 latency rounds and one full message each way split in halves
    assert dist.ring_allreduce_seconds(1e6, 2, 1e9, 1e-6) == pytest.approx(2e-6 + 1e-3)
    # 8 ranks, 3 buckets: 14 rounds per bucket, 2*7/8 of the bytes
    assert dist.ring_allreduce_seconds(8e6, 8, 2e9, 5e-6, buckets=3) == pytest.approx(42 * 5e-6 + 1.75 * 4e-3)
    model = nn.build("lenet", (1, 28, 28), 10, rng=0)
    assert dist.gradient_bytes(model) == 4 * model.num_parameters()
    rows = dist.predict(model, 0.01, [1, 2, 4], 1e9, 1e-5)
    assert rows[0].efficiency == 1.0 and rows[1].efficiency > rows[2].efficiency
    with pytest.raises(ValueError, match="bandwidth"):
        dist.ring_allreduce_seconds(1e6, 2, 0, 1e-6)


# -- start-up errors without mpiexec -------------------------------------------------------------

def test_distributed_without_mpiexec_says_what_to_run(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith(("PMI", "OMPI_", "PMIX", "MV2_"))}
    p = subprocess.run([sys.executable, "-m", "convkern", "train", "--distributed", "--epochs", "1", "--no-progress",
                        "--out", str(tmp_path / "r")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    if _have_mpi().startswith("mpi4py"):
        assert p.returncode == 2 and "pip install 'convkern[distributed]'" in p.stderr
    else:
        assert p.returncode == 2 and "not started by an MPI launcher" in p.stderr and "mpiexec -n 2" in p.stderr


def test_distributed_without_mpi4py_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from convkern import distributed as d\n"
            "try:\n    d.init()\nexcept d.DistributedError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(PMI_RANK="0"), capture_output=True,
                       text=True, timeout=60)
    assert "pip install 'convkern[distributed]'" in p.stdout, p.stderr


# -- whole jobs on 2 ranks -----------------------------------------------------------------------

# Two ranks sum their gradients in another order than one rank with the whole
# batch (each kernel's reduction order is fixed for a shape, not across batch
# sizes), so the runs agree to rounding. Adam divides by a gradient's running
# RMS: in float32 a rounding difference in a near-zero gradient moves its
# weight by up to a whole step (lr 1e-3), so Adam is held to 1e-12 in float64
# only; float32 is held to 1e-5 with SGD.
@needs_mpi
@pytest.mark.parametrize("dtype,optimizer,tol", [
    ("float64", "sgd", 1e-12), ("float64", "adam", 1e-12), ("float32", "sgd", 1e-5),
])
def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path, optimizer, dtype, tol):
    one = subprocess.run([sys.executable, WORKER, "steps", str(tmp_path), optimizer, dtype, "64"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two, _ = mpirun(tmp_path, 2, WORKER, "steps", str(tmp_path), optimizer, dtype, "64")
    assert two.returncode == 0, two.stderr
    a = np.load(tmp_path / f"params-{optimizer}-{dtype}-1.npz")
    b = np.load(tmp_path / f"params-{optimizer}-{dtype}-2.npz")
    init = nn.build("lenet", (1, 16, 16), 3, dtype=np.dtype(dtype), rng=0, dropout=0.0).state_dict()
    for k in a.files:
        assert a[k].dtype == np.dtype(dtype)
        assert np.abs(a[k] - init[k]).max() > 1e-3, f"{k} did not train"
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=tol, err_msg=k)


@needs_mpi
def test_cli_two_ranks_match_one_process_and_only_rank0_writes(tmp_path):
    common = ["--arch", "lenet5", "--dtype", "float64", "--epochs", "2", "--shapes-train", "712", "--no-progress",  # 640 train: 10 x 64
              "--optimizer", "adam"]
    one = subprocess.run([sys.executable, "-m", "convkern", "train", *common, "--batch-size", "64",
                          "--out", str(tmp_path / "one")], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two, _ = mpirun(tmp_path, 2, "-m", "convkern", "train", "--distributed", *common, "--batch-size", "32",
                    "--out", str(tmp_path / "two"), timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("epoch 2:") == 1, "only rank 0 logs"
    assert "on 2 ranks (batch 32 each, 64 in all)" in two.stdout
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["test"]["accuracy"] == pytest.approx(m1["test"]["accuracy"], abs=1e-9)
    assert sum(sum(r) for r in m2["confusion_matrix"]) == sum(sum(r) for r in m1["confusion_matrix"])
    for a, b in zip(m1["history"], m2["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["val_accuracy"] == a["val_accuracy"]
    p1, p2 = (nn.serialize.read(tmp_path / d / "last.npz")[1] for d in ("one", "two"))
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=1e-12, err_msg=k)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


@needs_mpi
def test_resume_on_two_ranks_ends_where_an_uninterrupted_run_does(tmp_path):
    common = ["-m", "convkern", "train", "--distributed", "--epochs", "3", "--batch-size", "32", "--shapes-train",
              "400", "--no-progress"]
    full, _ = mpirun(tmp_path, 2, *common, "--out", str(tmp_path / "full"), timeout=300)
    assert full.returncode == 0, full.stderr
    part, _ = mpirun(tmp_path, 2, *common, "--out", str(tmp_path / "part"), "--stop-after", "1", timeout=300)
    assert part.returncode == 0 and "continue with --resume" in part.stdout, part.stderr
    assert nn.serialize.read(tmp_path / "part" / "last.npz")[0]["epoch"] == 1
    rest, _ = mpirun(tmp_path, 2, "-m", "convkern", "train", "--distributed", "--no-progress", "--resume",
                     str(tmp_path / "part"), timeout=300)
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr
    a, b = (nn.serialize.read(tmp_path / d / "last.npz") for d in ("full", "part"))
    assert a[0]["epoch"] == b[0]["epoch"] == 3
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k]), k
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "part"))
    assert [r["train_loss"] for r in ma["history"]] == [r["train_loss"] for r in mb["history"]]


@needs_mpi
def test_a_rank_that_raises_ends_the_job_naming_it(tmp_path):
    proc, seconds = mpirun(tmp_path, 2, WORKER, "raise", str(tmp_path), timeout=120)
    why = f"rc {proc.returncode}, stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, why
    assert seconds < 60, why
    assert "rank 1 of 2 failed with RuntimeError: injected failure in the loss" in proc.stderr, why
    assert "[rank 1] Traceback" in proc.stderr, why
    model, header = nn.load_model(tmp_path / "run" / "last.npz")
    assert header["epoch"] == 1 and model.num_parameters() > 0


@needs_mpi
def test_a_rank_that_dies_ends_the_job(tmp_path):
    proc, seconds = mpirun(tmp_path, 2, WORKER, "die", str(tmp_path), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert seconds < 60
    pid = re.search(r"rank 1 pid (\d+) on ", proc.stdout)
    assert pid, "the log names each rank's pid: " + proc.stdout[:2000]
    assert re.search(rf"BAD TERMINATION.*\n.*PID {pid.group(1)} ", out), out[-3000:]


@needs_mpi
def test_a_hung_rank_is_caught_by_the_deadline(tmp_path):
    proc, seconds = mpirun(tmp_path, 2, WORKER, "hang", str(tmp_path), "2", timeout=120)
    assert proc.returncode != 0
    assert "rank 0 of 2 waited 2 s in the test allreduce" in proc.stderr
    assert seconds < 30


@needs_mpi
def test_ranks_that_disagree_on_the_model_are_refused(tmp_path):
    proc, _ = mpirun(tmp_path, 2, WORKER, "disagree", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for r in (0, 1):
        msg = (tmp_path / f"error-{r}.txt").read_text()
        assert "ranks disagree on the model's parameters" in msg and "rank 1 has" in msg


@needs_mpi
def test_ranks_that_disagree_on_the_data_are_refused(tmp_path):
    base = [sys.executable, "-m", "convkern", "train", "--distributed", "--epochs", "1", "--no-progress",
            "--shapes-train", "100", "--out", str(tmp_path / "r")]
    proc, _ = mpirun(tmp_path, 2, mpmd=[["-n", "1", *base, "--image-size", "28"],
                                        ["-n", "1", *base, "--image-size", "20"]])
    assert proc.returncode != 0
    assert "ranks disagree on the data" in proc.stderr


@needs_mpi
def test_rank0_tunes_and_the_others_adopt_its_choices(tmp_path):
    env = _env(CONVKERN_TUNE="on")
    parts = [["-n", "1", "-env", "XDG_CACHE_HOME", str(tmp_path / f"cache{r}"), sys.executable, WORKER, "tuning",
              str(tmp_path)] for r in range(2)]
    proc, _ = mpirun(tmp_path, 2, env=env, mpmd=parts, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r0, r1 = (json.loads((tmp_path / f"tune-{r}.json").read_text()) for r in range(2))
    assert r0["stats"]["measured"] > 0
    assert r1["stats"]["measured"] == 0, "rank 1 must not time its kernels"
    assert r1["choices"] == r0["choices"]
    assert not (tmp_path / "cache1").exists() or not any((tmp_path / "cache1").rglob("*.json"))


@needs_mpi
def test_bench_dist_reports_scaling_and_the_model(tmp_path):
    report = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "convkern", "bench-dist", "--rounds", "1", "--steps", "3", "--warmup",
                        "1", "--json", str(report)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "machine:" in p.stdout and "10 GbE (TCP)" in p.stdout
    data = json.loads(report.read_text())
    assert [r["ranks"] for r in data["rows"]] == [1, 2]
    assert data["rows"][0]["efficiency"] == 1.0 and 0 < data["rows"][1]["efficiency"] < 2.5
    assert data["rows"][1]["bytes"] == 4 * nn.build("lenet", (1, 28, 28), 10, rng=0).num_parameters()
