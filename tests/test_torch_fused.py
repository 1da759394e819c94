"""convkern.torch.conv2d_relu and the fused Conv2d + ReLU pairs of patched
nn.Sequential containers: torch's values and gradients (gradcheck in
float64), NaN as torch passes it, the registered op checked by opcheck, and
fusion only where it cannot be told apart from running module by module.
Skipped, saying why, without torch."""

import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: convkern.torch needs it")
pytestmark = pytest.mark.torch

import torch.nn.functional as TF  # noqa: E402
from torch import nn  # noqa: E402

import convkern.torch as ckt  # noqa: E402
from convkern.torch import modules, ops  # noqa: E402
from torch_cases import randn, rel  # noqa: E402

CASES = [  # kwargs, input shape, weight shape
    (dict(stride=2, padding=1), (2, 3, 8, 7), (4, 3, 3, 3)),
    (dict(groups=2, padding=(2, 1), dilation=(2, 1)), (1, 4, 7, 9), (6, 2, 3, 3)),
    (dict(padding="same"), (2, 3, 5, 6), (5, 3, 3, 3)),
    (dict(groups=4, padding=1), (2, 4, 6, 6), (4, 1, 3, 3)),
    (dict(), (3, 2, 1, 1), (4, 2, 1, 1)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kw,xs,ws", CASES)
def test_conv2d_relu_gradcheck(kw, xs, ws, channels_last):
    x, w, b = randn(*xs, grad=True), randn(*ws, seed=1, grad=True), randn(ws[0], seed=2, grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = ckt.conv2d_relu(x, w, b, **kw)
    assert rel(y, TF.relu(TF.conv2d(x, w, b, **kw))) < 1e-13
    if y.shape[1] > 1 and y.shape[2] * y.shape[3] > 1:  # otherwise both memory formats describe it
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.autograd.gradcheck(lambda x, w, b: ckt.conv2d_relu(x, w, b, **kw), (x, w, b))


@pytest.mark.parametrize("x_cl,gy_cl", [(False, False), (False, True), (True, True), (True, False)],
                         ids=["nchw", "gy-channels_last", "channels_last", "x-channels_last"])
def test_conv2d_relu_backward_is_the_unfused_backward_bit_for_bit(x_cl, gy_cl):
    """The fused backward hands relu's gradient to the conv's backward as an
    array, in whatever layout grad_output and the output give it: the
    gradients are still those of relu(conv2d(...)) run op by op, bit for bit."""
    fmt = torch.channels_last if x_cl else torch.contiguous_format
    x = randn(2, 5, 9, 8, dtype=torch.float32).to(memory_format=fmt).requires_grad_()
    w, b = randn(6, 5, 3, 3, seed=1, dtype=torch.float32, grad=True), randn(6, seed=2, dtype=torch.float32, grad=True)
    fused = ckt.conv2d_relu(x, w, b, padding=1)
    unfused = ckt.relu(ckt.conv2d(x, w, b, padding=1))
    assert torch.equal(fused, unfused)
    gy = randn(*fused.shape, seed=3, dtype=torch.float32).contiguous(memory_format=torch.channels_last if gy_cl else torch.contiguous_format)
    got, want = torch.autograd.grad(fused, (x, w, b), gy), torch.autograd.grad(unfused, (x, w, b), gy)
    assert all(torch.equal(p, q) for p, q in zip(got, want))
    assert rel(got[0], torch.autograd.grad(TF.relu(TF.conv2d(x, w, b, padding=1)), x, gy)[0]) < 1e-5


def test_conv2d_relu_passes_nan_as_torch_does():
    x, w = randn(2, 3, 6, 6, grad=True), randn(4, 3, 3, 3, seed=1, grad=True)
    with torch.no_grad():
        x[0, 1, 2, 3] = float("nan")
    y, want = ckt.conv2d_relu(x, w, padding=1), TF.relu(TF.conv2d(x, w, padding=1))
    assert y.isnan().any() and torch.equal(y.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(want)) or rel(torch.nan_to_num(y),
                                                                          torch.nan_to_num(want)) < 1e-13
    gy = randn(*y.shape, seed=3)
    for a, e in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(want, (x, w), gy)):
        assert torch.equal(a.isnan(), e.isnan())


def test_conv2d_relu_op_passes_opcheck_and_matches_its_eager_path():
    x, w, b = randn(2, 3, 7, 6, grad=True), randn(4, 3, 3, 3, seed=1, grad=True), randn(4, seed=2, grad=True)
    for args in [(x, w, b, [2, 1], [1, 0], False, [1, 1], 1, "auto", ""),
                 (x, w, None, [1, 1], [0, 0], True, [1, 2], 1, "im2col", "")]:
        result = torch.library.opcheck(ops.conv2d_relu.op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
        eager, registered = ops.conv2d_relu.call(*args), ops.conv2d_relu.op(*args)
        assert torch.equal(eager, registered)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        gy = randn(*eager.shape, seed=3)
        assert all(torch.equal(p, q) for p, q in zip(torch.autograd.grad(eager, tensors, gy),
                                                      torch.autograd.grad(registered, tensors, gy)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
        self.head = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = modules.F.conv2d_relu

    def spy(*args, **kw):
        calls.append(tuple(args[0].shape))
        return real(*args, **kw)

    monkeypatch.setattr(modules.F, "conv2d_relu", spy)
    return calls


def test_patched_sequential_fuses_conv_relu_pairs(fused_calls):
    model = Net().double()
    patched = ckt.patch(copy.deepcopy(model))
    assert type(patched.features) is modules.Sequential and isinstance(patched.features, nn.Sequential)
    rep = ckt.report(patched)
    assert rep.fused == ["features.0+1", "features.3+4"] and "fused conv+relu: features.0+1" in str(rep)
    x = randn(2, 3, 8, 8, seed=4)
    ours, theirs = grads(patched, x), grads(model, x)
    assert fused_calls == [(2, 3, 8, 8), (2, 8, 4, 4)]
    assert all(rel(a, b) < 1e-12 for a, b in zip(ours, theirs))
    assert list(patched.state_dict()) == list(model.state_dict())
    ckt.unpatch(patched)
    assert type(patched.features) is nn.Sequential and not ckt.report(patched).fused


def test_a_hook_turns_fusion_off_for_its_pair(fused_calls):
    patched = ckt.patch(Net().double())
    seen = []
    patched.features[4].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = randn(2, 3, 8, 8, seed=4)
    patched(x)
    assert fused_calls == [(2, 3, 8, 8)] and seen == [torch.Size([2, 6, 2, 2])]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        patched(x)
    finally:
        handle.remove()
    assert len(fused_calls) == 1, "a global module hook sees every module: nothing fuses"


def test_no_fusion_where_only_one_of_the_ops_is_patched_or_torch_runs_the_conv(fused_calls):
    model = ckt.patch(Net(), ops=("conv2d",))
    assert type(model.features) is nn.Sequential and not ckt.report(model).fused
    model(randn(1, 3, 8, 8, dtype=torch.float32))
    patched = ckt.patch(Net())  # float32 parameters, a bfloat16 input: torch runs it, unfused
    patched.to(torch.bfloat16)
    patched(randn(1, 3, 8, 8, dtype=torch.float32).to(torch.bfloat16))
    assert fused_calls == []
    assert ckt.report(patched).fallbacks
