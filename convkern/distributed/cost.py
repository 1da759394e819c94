"""What a data-parallel step costs in communication, so the scaling on a
cluster can be predicted before buying time on one.

Each step allreduces every gradient once: ``P`` parameters of ``s`` bytes
are ``B = P * s`` bytes. A ring allreduce over ``N`` ranks (what MPI and
NCCL use for large messages) runs a reduce-scatter and an allgather, each
``N - 1`` rounds; every round moves ``B / N`` bytes per rank and pays one
latency ``alpha``. With link bandwidth ``beta`` (bytes/s) and ``k`` buckets:

    T(N) = 2 (N - 1) k alpha  +  2 (N - 1) / N * B / beta

The bandwidth term tends to ``2 B / beta`` as N grows, so a step's
communication is nearly flat in N; the latency term grows with N and with
the bucket count. With compute time ``t`` per step on one rank (at the
per-rank batch), gradients reduced after backward (no overlap), the
predicted scaling efficiency is ``t / (t + T(N))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List

import numpy as np


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float, buckets: int = 1) -> float:
    """Time of a ring allreduce of `nbytes` over `ranks` ranks, in seconds
    (`bandwidth` in bytes/s per link, `latency` in seconds per message)."""
    if ranks < 1 or bandwidth <= 0 or latency < 0 or buckets < 1:
        raise ValueError(f"ring_allreduce_seconds: ranks ({ranks}) and buckets ({buckets}) must be >= 1, "
                         f"bandwidth ({bandwidth}) > 0 and latency ({latency}) >= 0")
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * buckets * latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


@dataclass
class StepCost:
    ranks: int
    nbytes: int
    comm_s: float
    compute_s: float

    @property
    def efficiency(self) -> float:
        return self.compute_s / (self.compute_s + self.comm_s)


def gradient_bytes(model) -> int:
    """Bytes allreduced per step: every parameter's gradient, once."""
    return int(sum(int(np.prod(p.shape)) * np.dtype(p.data.dtype).itemsize for p in model.parameters()))


def predict(model, compute_s: float, ranks: Iterable[int], bandwidth: float, latency: float,
            buckets: int = 1) -> List[StepCost]:
    """Communication time and scaling efficiency per rank count, for a step
    that takes `compute_s` seconds of kernels on one rank."""
    b = gradient_bytes(model)
    return [StepCost(n, b, ring_allreduce_seconds(b, n, bandwidth, latency, buckets), compute_s) for n in ranks]


# Links to read the model against (bandwidth in bytes/s, latency in s): typical
# figures for the kinds, not measurements of any one machine.
LINKS: Dict[str, tuple] = {
    "shared memory (one machine)": (10e9, 1e-6),
    "10 GbE (TCP)": (1.25e9, 30e-6),
    "100 Gb/s InfiniBand": (12.5e9, 2e-6),
}
