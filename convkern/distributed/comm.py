"""The process group: MPI through mpi4py, with the two guarantees MPI itself
lacks for a training job.

- **No hang.** MPI collectives have no timeout: a rank stuck in a kernel, or
  gone without the launcher noticing, leaves the others waiting forever.
  Every collective here is non-blocking and waited on with a deadline
  (``timeout``, default 60 s); past it the waiting rank prints what it
  waited for and calls ``MPI_Abort``, which ends every rank.
- **One failure ends the job.** An exception that reaches the top of a rank
  (``sys.excepthook``) prints its traceback under the rank's number and
  aborts the job, instead of leaving the other ranks in their next
  collective.

A ``Comm`` of size 1 with no MPI underneath (``LocalComm``) has the same
methods, so single-process code needs no branches.
"""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, List, Optional

import numpy as np

DEFAULT_TIMEOUT = 60.0
ABORT_GRACE = 1.0  # seconds between an aborting rank's message and MPI_Abort

# Set by the launchers that start ranks: MPICH/Intel MPI (hydra), Open MPI,
# PMIx-based launchers, MVAPICH. A process started without one of them is a
# singleton, which `--distributed` refuses (it would silently train alone).
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

HOW_TO_RUN = "mpiexec -n 2 convkern train --distributed ...  (pip install 'convkern[distributed]' gives mpiexec)"


class DistributedError(RuntimeError):
    """Distributed training cannot start: MPI missing, no launcher, ranks that disagree."""


def launched_by_mpi() -> bool:
    """Whether this process was started by an MPI launcher (mpiexec, srun with PMI)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def _timeout_from_env() -> float:
    raw = os.environ.get("CONVKERN_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"CONVKERN_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise DistributedError(f"CONVKERN_DIST_TIMEOUT must be > 0, got {raw!r}")
    return value


class LocalComm:
    """One process, no MPI: every collective is the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    timeout = DEFAULT_TIMEOUT
    distributed = False

    def allreduce_(self, buf, what: str = "allreduce"):
        return buf

    def iallreduce_(self, buf):
        return None

    def wait(self, request, what: str = "collective") -> None:
        return None

    def bcast_(self, buf, root: int = 0, what: str = "broadcast"):
        return buf

    def bcast_obj(self, obj: Any, root: int = 0, what: str = "broadcast") -> Any:
        return obj

    def allgather_obj(self, obj: Any, what: str = "allgather") -> List[Any]:
        return [obj]

    def barrier(self, what: str = "barrier", idle: bool = False, timeout: Optional[float] = None) -> None:
        return None

    def roster(self) -> str:
        """Each rank's process id and host, one line: the launcher names a
        rank that died by its pid, so a job's log should say which is which."""
        who = self.allgather_obj((os.getpid(), socket.gethostname()), "the roster")
        return ", ".join(f"rank {r} pid {pid} on {host}" for r, (pid, host) in enumerate(who))

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    def nccl(self):
        """A single-rank NCCL communicator is pointless: callers skip it at size 1."""
        return None


class MPIComm(LocalComm):
    """MPI_COMM_WORLD of an mpiexec-launched job, every wait under a deadline."""

    distributed = True

    def __init__(self, timeout: Optional[float] = None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.timeout = _timeout_from_env() if timeout is None else float(timeout)
        self._nccl = None

    # -- waiting, with the deadline
    def wait(self, request, what: str = "collective", timeout: Optional[float] = None, idle: bool = False) -> None:
        """Wait for `request`, aborting the job if it has not completed within
        the deadline. Spins briefly (a collective between busy ranks finishes
        in microseconds), then sleeps between tests; `idle` sleeps from the
        start, for waits that are expected to be long (another rank tuning),
        so the waiting rank leaves its core to the one working."""
        if request is None:
            return
        limit = self.timeout if timeout is None else timeout
        start = time.monotonic()
        spin_until = start + (0.0 if idle else 0.002)
        nap = 1e-4
        while not request.Test():
            now = time.monotonic()
            if now - start > limit:
                self.abort(f"convkern.distributed: rank {self.rank} of {self.size} waited {limit:g} s in {what} "
                           f"for ranks that never arrived (one of them hangs or died); aborting every rank. "
                           f"CONVKERN_DIST_TIMEOUT sets the limit.", code=3)
            if now >= spin_until:
                time.sleep(nap)
                nap = min(nap * 2, 0.01 if idle else 1e-3)

    # -- collectives on arrays (NumPy, in place)
    def iallreduce_(self, buf):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def allreduce_(self, buf, what: str = "allreduce"):
        """Sum `buf` over the ranks, in place."""
        self.wait(self.iallreduce_(buf), what)
        return buf

    def bcast_(self, buf, root: int = 0, what: str = "broadcast"):
        self.wait(self.comm.Ibcast(buf, root=root), what)
        return buf

    # -- collectives on Python objects (pickled; every rank is the same trusted program)
    def bcast_obj(self, obj: Any, root: int = 0, what: str = "broadcast") -> Any:
        data = pickle.dumps(obj) if self.rank == root else b""
        n = np.array([len(data)], np.int64)
        self.bcast_(n, root, what)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.bcast_(buf, root, what)
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def allgather_obj(self, obj: Any, what: str = "allgather") -> List[Any]:
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.empty(self.size, np.int64)
        self.wait(self.comm.Iallgather(np.array([data.size], np.int64), sizes), what)
        out = np.empty(int(sizes.sum()), np.uint8)
        self.wait(self.comm.Iallgatherv(data, (out, sizes)), what)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(out[offsets[i]:offsets[i + 1]].tobytes()) for i in range(self.size)]

    def barrier(self, what: str = "barrier", idle: bool = False, timeout: Optional[float] = None) -> None:
        self.wait(self.comm.Ibarrier(), what, timeout=timeout, idle=idle)

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        # The launcher forwards each rank's output through a pipe and stops
        # reading once it sees the abort: give it a moment to drain the pipe,
        # or the message saying why the job ended can be lost.
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)

    # -- GPUs
    def nccl(self):
        """The NCCL communicator over every rank's current CuPy device, made
        on first use (rank 0's unique id travels over MPI)."""
        if self._nccl is None:
            from cupy.cuda import nccl

            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self.bcast_obj(uid, 0, "the NCCL id broadcast")
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl


_world: Optional[LocalComm] = None


def world() -> LocalComm:
    """The process group set up by init(), or a one-process LocalComm."""
    return _world if _world is not None else LocalComm()


def init(timeout: Optional[float] = None, threads: bool = True) -> MPIComm:
    """Join the MPI job this process was launched into (mpiexec) and return
    its communicator. Installs the abort-on-exception hook and, unless
    OMP_NUM_THREADS says otherwise (or threads=False), gives each rank an
    equal share of its machine's cores for the kernels."""
    global _world
    if _world is not None:
        return _world
    try:
        importlib.import_module("mpi4py")
    except ImportError:
        raise DistributedError("distributed training needs mpi4py and an MPI library: "
                               "pip install 'convkern[distributed]' (mpi4py and MPICH), then run "
                               + HOW_TO_RUN) from None
    if not launched_by_mpi():
        raise DistributedError("this process was not started by an MPI launcher; run it as: " + HOW_TO_RUN)
    _world = MPIComm(timeout)
    _install_excepthook(_world)
    if threads and "OMP_NUM_THREADS" not in os.environ:
        _share_cores(_world)
    return _world


def _share_cores(comm: MPIComm) -> None:
    from .. import BackendUnavailableError, set_num_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        set_num_threads(max(1, cores // comm.local_size))
    except BackendUnavailableError:  # no compiled kernels: nothing to share
        pass


def _install_excepthook(comm: MPIComm) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        if comm.size == 1:
            previous(kind, value, tb)
            return
        text = "".join(traceback.format_exception(kind, value, tb))
        prefix = f"[rank {comm.rank}] "
        print("".join(prefix + line + "\n" for line in text.rstrip().splitlines()), file=sys.stderr, end="",
              flush=True)
        comm.abort(f"convkern.distributed: rank {comm.rank} of {comm.size} failed with {kind.__name__}: {value}; "
                   f"aborting every rank", code=1)

    sys.excepthook = hook
