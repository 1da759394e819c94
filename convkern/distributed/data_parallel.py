"""DataParallel: the same model on every rank, each rank a slice of the
batch, gradients averaged after backward (PyTorch's DistributedDataParallel
for convkern.nn's explicit forward/backward).

Gradients travel in a few flat buckets of about `bucket_mb` each, not one
message per parameter: an allreduce costs a latency term per call, and a
LeNet has eight parameters of a few hundred bytes beside one of 400 KB.
The buckets hold parameters in reverse order (the last layer's gradients
are the first a backward pass finishes) and never change, so every rank
sums the same bytes in the same order and results are deterministic. On the
CPU each bucket's allreduce starts as soon as it is packed, overlapping the
packing of the next; on the GPU the buckets go through NCCL on the current
CuPy stream.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..nn.module import Module, Parameter, array_module
from .comm import DistributedError, LocalComm, world


def _signature(params: Sequence[Tuple[str, Parameter]]) -> List[Tuple[str, Tuple[int, ...], str]]:
    return [(name, tuple(p.shape), str(p.data.dtype)) for name, p in params]


def check_agreement(comm: LocalComm, value, what: str) -> None:
    """Raise DistributedError on every rank if the ranks' `value`s differ,
    naming the ranks that differ from rank 0."""
    if comm.size == 1:
        return
    values = comm.allgather_obj(value, f"the start-up check of {what}")
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise DistributedError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, rank {odd[0]} has "
                               f"{values[odd[0]]!r} (ranks differing from rank 0: {odd})")


class _Bucket:
    __slots__ = ("params", "offsets", "buf")

    def __init__(self, params: List[Parameter], xp, dtype):
        self.params = params
        sizes = [int(np.prod(p.shape)) for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self.buf = xp.empty(self.offsets[-1], dtype=dtype)


class DataParallel(Module):
    """Wrap `module` for data-parallel training over `comm` (default: the
    process group of convkern.distributed.init()).

    At construction the ranks check that they hold the same parameters
    (names, shapes, dtypes) and take rank 0's values. ``backward`` runs the
    module's backward, then replaces every parameter's gradient by its mean
    over the ranks; the optimizer is the user's, untouched. Each rank should
    see the same number of samples per step (DistributedSampler pads for
    that), so the mean of the ranks' mean gradients is the gradient of the
    whole global batch's mean loss.

    The wrapped module is ``.module``; save and load that one.
    """

    def __init__(self, module: Module, comm: Optional[LocalComm] = None, bucket_mb: float = 4.0,
                 broadcast: bool = True):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DataParallel: module must be a convkern.nn.Module, got {type(module).__name__}")
        if not bucket_mb > 0:
            raise ValueError(f"DataParallel: bucket_mb must be > 0, got {bucket_mb}")
        self.module = module
        object.__setattr__(self, "comm", comm if comm is not None else world())
        named = list(module.named_parameters())
        check_agreement(self.comm, _signature(named), "the model's parameters (name, shape, dtype)")
        params = [p for _, p in named]
        object.__setattr__(self, "_buckets", self._make_buckets(params, int(bucket_mb * (1 << 20))))
        if broadcast:
            self.broadcast_parameters()

    def _make_buckets(self, params: List[Parameter], limit: int) -> List[_Bucket]:
        buckets: List[_Bucket] = []
        by_dtype = {}
        for p in reversed(params):
            by_dtype.setdefault(np.dtype(p.data.dtype), []).append(p)
        for dtype, group in by_dtype.items():
            xp = array_module(group[0].data)
            current: List[Parameter] = []
            size = 0
            for p in group:
                nbytes = int(np.prod(p.shape)) * dtype.itemsize
                if current and size + nbytes > limit:
                    buckets.append(_Bucket(current, xp, dtype))
                    current, size = [], 0
                current.append(p)
                size += nbytes
            if current:
                buckets.append(_Bucket(current, xp, dtype))
        return buckets

    @property
    def bucket_sizes(self) -> List[int]:
        """Elements per bucket, in the order they are reduced."""
        return [b.offsets[-1] for b in self._buckets]

    # -- the work
    def forward(self, x):
        return self.module.forward(x)

    def backward(self, grad_output, need_input_grad: bool = True):
        grad_input = self.module.backward(grad_output, need_input_grad=need_input_grad)
        self.allreduce_gradients()
        return grad_input

    def broadcast_parameters(self, root: int = 0) -> None:
        """Give every rank `root`'s parameter values (packed like the gradients)."""
        if self.comm.size == 1:
            return
        for b in self._buckets:
            for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
                b.buf[lo:hi] = p.data.reshape(-1)
            self._bcast(b.buf, root)
            for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
                p.data[...] = b.buf[lo:hi].reshape(p.shape)

    def allreduce_gradients(self) -> None:
        """Replace each parameter's .grad by its mean over the ranks. A
        parameter without a gradient on this rank counts as zeros (and gets
        the mean), so every rank sends the same buckets."""
        if self.comm.size == 1:
            return
        gpu = array_module(self._buckets[0].buf) is not np
        requests = []
        for b in self._buckets:
            for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
                if p.grad is None:
                    b.buf[lo:hi] = 0
                else:
                    b.buf[lo:hi] = p.grad.reshape(-1)
            if gpu:
                self._nccl_allreduce(b.buf)
            else:
                requests.append(self.comm.iallreduce_(b.buf))
        for r in requests:
            self.comm.wait(r, "the gradient allreduce")
        if gpu:
            self._nccl_wait("the gradient allreduce")
        scale = 1.0 / self.comm.size
        for b in self._buckets:
            for p, lo, hi in zip(b.params, b.offsets, b.offsets[1:]):
                mean = b.buf[lo:hi].reshape(p.shape)
                g = p.grad
                if g is not None and g.shape == p.shape and g.dtype == b.buf.dtype and g.flags.c_contiguous \
                        and g.flags.writeable:
                    array_module(g).multiply(mean, scale, out=g)
                else:
                    p.grad = mean * scale

    # -- transport
    def _bcast(self, buf, root: int) -> None:
        if array_module(buf) is np:
            self.comm.bcast_(buf, root, "the parameter broadcast")
            return
        import cupy
        from cupy.cuda import nccl

        stream = cupy.cuda.get_current_stream()
        self.comm.nccl().bcast(buf.data.ptr, buf.size, _nccl_dtype(nccl, buf.dtype), root, stream.ptr)
        self._nccl_wait("the parameter broadcast")

    def _nccl_allreduce(self, buf) -> None:
        import cupy
        from cupy.cuda import nccl

        stream = cupy.cuda.get_current_stream()
        self.comm.nccl().allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(nccl, buf.dtype),
                                   nccl.NCCL_SUM, stream.ptr)

    def _nccl_wait(self, what: str) -> None:
        """NCCL calls queue on the stream; wait for it under the same deadline
        as MPI's collectives (a rank missing from an NCCL call hangs the rest)."""
        import cupy

        self.comm.wait(_StreamDone(cupy.cuda.get_current_stream()), what)


class _StreamDone:
    """A stream seen as a request: Test() is whether its queued work is done."""

    def __init__(self, stream):
        self.stream = stream

    def Test(self) -> bool:  # noqa: N802 (mpi4py's name, so comm.wait takes both)
        return bool(self.stream.done)


def _nccl_dtype(nccl, dtype) -> int:
    codes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    try:
        return codes[np.dtype(dtype)]
    except KeyError:
        raise DistributedError(f"DataParallel: NCCL buckets hold float32 or float64, got {dtype}") from None
