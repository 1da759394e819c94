"""convkern.distributed: data-parallel training over MPI (CPU) and NCCL (GPU).

Launch one process per rank with the MPI launcher; each joins the job,
wraps its model and shards the data::

    # mpiexec -n 2 python train.py
    from convkern import distributed as dist, nn

    comm = dist.init()                                    # MPI_COMM_WORLD, with deadlines
    model = dist.DataParallel(nn.build("lenet", (1, 28, 28), 10, rng=0))   # rank 0's weights everywhere
    opt = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = dist.DistributedSampler(len(images), comm.size, comm.rank, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        idx = sampler.indices()
        for i in range(0, len(idx), 32):
            x, y = images[idx[i:i + 32]], labels[idx[i:i + 32]]
            loss = crit(model(x), y)
            opt.zero_grad(); model.backward(crit.backward(), need_input_grad=False); opt.step()

``convkern train --distributed`` does all of this (plus sharded evaluation,
rank-0-only output and resumable checkpoints) under
``mpiexec -n N convkern train --distributed``.

MPI comes from mpi4py (``pip install 'convkern[distributed]'`` installs it
with MPICH's wheel); CuPy arrays are reduced over NCCL (``cupy.cuda.nccl``).
"""

from .comm import (DEFAULT_TIMEOUT, DistributedError, LocalComm, MPIComm, init, launched_by_mpi,
                   world)
from .cost import gradient_bytes, predict, ring_allreduce_seconds
from .data_parallel import DataParallel, check_agreement
from .sampler import DistributedSampler

__all__ = ["init", "world", "launched_by_mpi", "DataParallel", "DistributedSampler", "DistributedError",
           "LocalComm", "MPIComm", "DEFAULT_TIMEOUT", "check_agreement", "gradient_bytes", "predict",
           "ring_allreduce_seconds"]
