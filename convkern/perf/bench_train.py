"""`convkern bench-train`: the LeNet-like model's training step (and inference)
at a given batch, convkern's backends next to PyTorch (NCHW and channels_last
when installed), timed in interleaved rounds in one process so the shared
machine's state hits every peer alike. Each peer's logits are checked against
convkern's before anything is timed."""

from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional

import numpy as np

from .. import nn
from ..backend import info, use_backend

INPUT = (1, 28, 28)
CLASSES = 10


def _convkern_runs(backend: str, batch: int, state, x, y, channels_last: bool = False
                   ) -> Dict[str, Callable[[], object]]:
    model = nn.build("lenet", INPUT, CLASSES, rng=0)
    model.load_state_dict(state)
    if channels_last:
        model.to(memory_format="channels_last")
    crit = nn.CrossEntropyLoss()
    opt = nn.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with use_backend(backend):
            model.train()
            opt.zero_grad()
            crit(model(x), y)
            model.backward(crit.backward(), need_input_grad=False)
            opt.step()

    def infer(xs):
        def run():
            with use_backend(backend):
                return model.eval()(xs)
        return run

    return {"train step": step, f"inference b{batch}": infer(x), "inference b1": infer(x[:1])}


def _torch_runs(torch, channels_last: bool, state, x, y) -> Dict[str, Callable[[], object]]:
    tnn = torch.nn
    model = tnn.Sequential(tnn.Conv2d(1, 32, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
                           tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                           tnn.Linear(3136, 128), tnn.ReLU(), tnn.Dropout(0.25), tnn.Linear(128, CLASSES))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    tx = torch.from_numpy(x).contiguous(memory_format=fmt)
    ty = torch.from_numpy(y)
    crit, opt = tnn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad()
        crit(model(tx), ty).backward()
        opt.step()

    def infer(xs):
        def run():
            model.eval()
            with torch.no_grad():
                return model(xs)
        return run

    return {"train step": step, f"inference b{len(x)}": infer(tx), "inference b1": infer(tx[:1])}


def run(batch: int = 64, rounds: int = 15, backends: Optional[List[str]] = None, with_torch: bool = True,
        reps: int = 3) -> dict:
    from .bench import _torch, interleaved_peer_ms

    rng = np.random.default_rng(0)
    x = rng.random((batch,) + INPUT, dtype=np.float32)
    y = rng.integers(0, CLASSES, batch)
    state = nn.build("lenet", INPUT, CLASSES, rng=0).state_dict()
    peers: Dict[str, Dict[str, Callable[[], object]]] = {}
    for b in backends or ["cpp"]:
        peers[f"convkern {b}"] = _convkern_runs(b, batch, state, x, y)
        if info(b).device == "cpu":  # the layout torch's fast peer runs, asked for the same way
            peers[f"convkern {b} channels_last"] = _convkern_runs(b, batch, state, x, y, channels_last=True)
    torch = _torch() if with_torch else None
    if torch is not None:
        peers["torch NCHW"] = _torch_runs(torch, False, state, x, y)
        peers["torch channels_last"] = _torch_runs(torch, True, state, x, y)
    # validate before timing: every peer's eval logits match the first's (fresh weights, same input)
    ref = None
    for name, runs in peers.items():
        out = runs[f"inference b{batch}"]()
        out = out.detach().numpy() if hasattr(out, "detach") else np.asarray(out)
        if ref is None:
            ref = out
        elif not np.allclose(out, ref, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"bench-train: {name}'s logits differ from {next(iter(peers))}'s")
    return {"batch": batch, "rounds": rounds, "reps": reps, "median_ms": interleaved_peer_ms(peers, rounds, reps)}


def table(report: dict) -> str:
    """ms per call for each peer, with the speed relative to the faster torch
    layout (NCHW or channels_last) in each column."""
    med = report["median_ms"]
    kinds = list(next(iter(med.values())))
    torch_peers = [p for p in ("torch NCHW", "torch channels_last") if p in med]
    best = {k: min(med[p][k] for p in torch_peers) for k in kinds} if torch_peers else None
    lines = [f"LeNet-like model, batch {report['batch']}: ms per call, median over {report['rounds']} interleaved "
             f"rounds of {report['reps']} calls"]
    lines.append(f"{'peer':<28}" + "".join(f"{k:>18}" for k in kinds))
    for p, ks in med.items():
        cells = []
        for k in kinds:
            ratio = f" ({best[k] / ks[k]:.2f}x)" if best else ""
            cells.append(f"{ks[k]:>9.2f}{ratio:>9}")
        lines.append(f"{p:<28}" + "".join(cells))
    if best:
        lines.append("(Nx) = speed relative to the faster torch layout (NCHW or channels_last) in that column: "
                     "above 1 is faster")
    return "\n".join(lines)


def main(args) -> int:
    from .bench_net import machine, machine_line

    backends = args.backends.split(",") if args.backends else None
    print(machine_line(machine()))
    report = run(args.batch, args.rounds, backends, with_torch=not args.no_torch)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
