"""Run by tests/test_distributed.py under mpiexec (or alone, as one process):
each subcommand is one scenario, writing its result under the given directory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def steps(out: Path, optimizer: str, dtype: str, global_batch: int, n_steps: int = 20) -> None:
    """n_steps of LeNet (dropout off) on the same global batches whatever the
    rank count: rank r of R takes its DistributedSampler shard, batch
    global_batch / R. Rank 0 writes the parameters."""
    from convkern import distributed as dist, nn
    from convkern.data import make_shapes

    comm = dist.init() if dist.launched_by_mpi() else dist.LocalComm()
    data = make_shapes(n_steps * global_batch, 16, 1, seed=5)
    per_rank = global_batch // comm.size
    model = nn.build("lenet", (1, 16, 16), 3, dtype=np.dtype(dtype), rng=comm.rank, dropout=0.0)  # rank 0's wins
    net = dist.DataParallel(model, comm)
    opt = (nn.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
           if optimizer == "sgd" else nn.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4))
    crit = nn.CrossEntropyLoss()
    sampler = dist.DistributedSampler(len(data), comm.size, comm.rank, seed=3)
    sampler.set_epoch(1)
    idx = sampler.indices()
    for i in range(n_steps):
        b = idx[i * per_rank:(i + 1) * per_rank]
        crit(net(data.images[b].astype(dtype)), data.labels[b])
        opt.zero_grad()
        net.backward(crit.backward(), need_input_grad=False)
        opt.step()
    if comm.rank == 0:
        np.savez(out / f"params-{optimizer}-{dtype}-{comm.size}.npz", **model.state_dict())


def raise_mid_epoch(out: Path) -> None:
    """convkern train on 2 ranks where rank 1 raises in epoch 2."""
    from convkern import distributed as dist, nn
    from convkern.app.train import TrainConfig, fit

    comm = dist.init()
    calls = {"n": 0}
    real = nn.CrossEntropyLoss.backward

    def backward(self):
        calls["n"] += 1
        if comm.rank == 1 and calls["n"] == 12:  # epoch 1 has 9 steps per rank (600 images)
            raise RuntimeError("injected failure in the loss")
        return real(self)

    nn.CrossEntropyLoss.backward = backward
    fit(TrainConfig(epochs=3, batch_size=32, shapes_train=640, out=str(out / "run"), progress=False,
                    distributed=True))


def die(out: Path) -> None:
    """Rank 1 is killed outright (no exception, no hook) in the middle of training."""
    import os
    import signal

    from convkern import distributed as dist
    from convkern.app.train import TrainConfig, fit

    comm = dist.init()
    if comm.rank == 1:
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
        signal.setitimer(signal.ITIMER_REAL, 1.5)
    fit(TrainConfig(epochs=50, batch_size=32, shapes_train=640, out=str(out / "run"), progress=False,
                    distributed=True))


def hang(out: Path, seconds: float) -> None:
    """Rank 1 never joins rank 0's allreduce."""
    from convkern import distributed as dist

    comm = dist.init(timeout=seconds)
    if comm.rank == 1:
        time.sleep(600)
    comm.allreduce_(np.ones(4), "the test allreduce")


def disagree(out: Path) -> None:
    """Rank 1 builds a model of another width: DataParallel must refuse."""
    from convkern import distributed as dist, nn

    comm = dist.init()
    model = nn.build("vgg", (1, 16, 16), 3, rng=0, width=8 if comm.rank == 0 else 4)
    try:
        dist.DataParallel(model, comm)
    except dist.DistributedError as exc:
        (out / f"error-{comm.rank}.txt").write_text(str(exc))


def tuning(out: Path) -> None:
    """convkern train with tuning on: rank 0 measures, rank 1 adopts its choices."""
    from convkern import distributed as dist, tune
    from convkern.app.train import TrainConfig, fit

    comm = dist.init()
    fit(TrainConfig(epochs=1, batch_size=16, shapes_train=160, out=str(out / "run"), progress=False,
                    distributed=True, arch="vgg"))
    (out / f"tune-{comm.rank}.json").write_text(json.dumps({"stats": tune._stats, "choices": tune.choices()}))


def nccl_single_rank(out: Path) -> None:
    """One rank, one GPU: NCCL's allreduce and broadcast through DataParallel's buckets."""
    import cupy

    from convkern import distributed as dist, nn

    comm = dist.init()
    model = nn.build("lenet", (1, 16, 16), 3, rng=0, dropout=0.0).to(device="cuda")
    dp = dist.DataParallel(model, comm)
    x = cupy.asarray(np.random.default_rng(1).standard_normal((4, 1, 16, 16)), dtype=cupy.float32)
    crit = nn.CrossEntropyLoss()
    crit(dp(x), cupy.asarray([0, 1, 2, 0]))
    model.backward(crit.backward(), need_input_grad=False)
    before = [cupy.asnumpy(p.grad).copy() for p in model.parameters()]
    for b in dp._buckets:
        for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
            b.buf[lo:hi] = p.grad.reshape(-1)
        dp._nccl_allreduce(b.buf)
        dp._bcast(b.buf, 0)
    dp._nccl_wait("the test")
    got = [cupy.asnumpy(b.buf) for b in dp._buckets]
    want = [np.concatenate([before[model.parameters().index(p)].ravel() for p in b.params]) for b in dp._buckets]
    ok = all(np.array_equal(g, w) for g, w in zip(got, want))
    (out / "nccl.json").write_text(json.dumps({"ok": ok}))


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    {"steps": lambda: steps(where, sys.argv[3], sys.argv[4], int(sys.argv[5])),
     "raise": lambda: raise_mid_epoch(where),
     "hang": lambda: hang(where, float(sys.argv[3])),
     "die": lambda: die(where),
     "disagree": lambda: disagree(where),
     "tuning": lambda: tuning(where),
     "nccl": lambda: nccl_single_rank(where)}[what]()
