"""convkern.nn step for step against PyTorch (golden file; torch itself where
installed), and each layer, loss, optimizer and schedule on its own."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

import convkern
import convkern.nn as nn
import nn_cases
from convkern.perf.verify import relative_error
from helpers import assert_close, numeric_grad, randn

GOLDEN = pathlib.Path(__file__).parent / "golden" / "nn_golden.npz"
TOL = {"float64": 1e-10, "float32": 1e-5}


def _device(backend: str) -> str:
    return {b.name: b for b in convkern.backends()}[backend].device


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("opt", list(nn_cases.OPTIMIZERS))
def test_training_steps_match_torch_golden(golden, backend, dtype, opt):
    """Logits, loss, every gradient and every parameter after 3 steps."""
    dt = np.dtype(dtype).name
    state = {k.split("/", 2)[2]: v for k, v in golden.items() if k.startswith(f"{dt}/init/")}
    with convkern.use_backend(backend):
        got = nn_cases.run_convkern(dtype, opt, state, device=_device(backend))
    want = {k.split("/", 2)[2]: v for k, v in golden.items() if k.startswith(f"{dt}/{opt}/")}
    assert set(got) == set(want)
    for k, ref in want.items():
        assert_close(got[k], ref, dtype, f"{opt} {k}", tol=TOL[dt])
    # the run did train: parameters moved from their initial values
    assert relative_error(got["step3/0.weight"], state["0.weight"]) > 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("opt", list(nn_cases.OPTIMIZERS))
def test_training_steps_match_torch_directly(dtype, opt):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the golden file covers this")
    state = nn_cases.convkern_model(dtype, seed=11).state_dict()
    got = nn_cases.run_convkern(dtype, opt, state)
    want = nn_cases.run_torch(torch, dtype, opt, state)
    for k, ref in want.items():
        assert_close(got[k], ref, dtype, f"{opt} {k}", tol=TOL[np.dtype(dtype).name])


@pytest.mark.torch
def test_initialisation_matches_torch_distribution():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    conv, lin = nn.Conv2d(16, 32, 3, rng=0), nn.Linear(400, 50, rng=0)
    tconv, tlin = torch.nn.Conv2d(16, 32, 3), torch.nn.Linear(400, 50)
    for ours, theirs, fan_in in ((conv, tconv, 16 * 9), (lin, tlin, 400)):
        bound = 1 / math.sqrt(fan_in)  # the one range both rules must share
        for name in ("weight", "bias"):
            a, b = getattr(ours, name).data, getattr(theirs, name).detach().numpy()
            assert a.shape == b.shape
            assert np.abs(a).max() <= bound and np.abs(b).max() <= bound
        # thousands of weights reach close to the edge of the range in both
        assert np.abs(ours.weight.data).max() > 0.97 * bound
        assert np.abs(theirs.weight.detach().numpy()).max() > 0.97 * bound


def test_initialisation_bounds_and_seed():
    conv = nn.Conv2d(8, 16, (3, 5), rng=3)
    bound = 1 / math.sqrt(8 * 3 * 5)
    w = conv.weight.data
    assert w.shape == (16, 8, 3, 5) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.abs(conv.bias.data).max() <= bound
    again = nn.Conv2d(8, 16, (3, 5), rng=3)
    np.testing.assert_array_equal(w, again.weight.data)
    nn.manual_seed(9)
    a = nn.Linear(10, 4).weight.data
    nn.manual_seed(9)
    np.testing.assert_array_equal(a, nn.Linear(10, 4).weight.data)


def test_cross_entropy_gradient_and_smoothing(rng):
    logits = randn(rng, (4, 5), np.float64)
    target = rng.integers(0, 5, 4)
    for eps in (0.0, 0.2):
        crit = nn.CrossEntropyLoss(label_smoothing=eps)
        crit(logits, target)
        num = numeric_grad(lambda _: float(nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)), logits)
        assert relative_error(crit.backward(), num) < 1e-7
    # by definition: mean over rows of -(1-eps) log p_y - eps/C sum_c log p_c
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = np.mean(-(0.8) * logp[np.arange(4), target] - 0.2 / 5 * logp.sum(1))
    assert abs(float(nn.CrossEntropyLoss(label_smoothing=0.2)(logits, target)) - want) < 1e-12


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], np.float32)
    crit = nn.CrossEntropyLoss()
    loss = float(crit(logits, np.array([0, 0])))
    assert np.isfinite(loss) and abs(loss - 5e4) < 1.0
    g = crit.backward()
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(nn.softmax(logits).sum(1), 1.0, rtol=1e-6)


def test_cross_entropy_rejects_bad_targets():
    crit = nn.CrossEntropyLoss()
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 4\)"):
        crit(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"target must be \(3,\)"):
        crit(x, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        crit(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=1.5)


@pytest.mark.parametrize("layer", ["linear", "flatten"])
def test_linear_and_flatten_gradients(rng, layer):
    x = randn(rng, (3, 2, 2, 3), np.float64)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, dtype=np.float64, rng=1))
    gy = randn(rng, (3, 5), np.float64)
    m(x)
    gx = m.backward(gy)
    num = numeric_grad(lambda _: float(np.sum(m(x) * gy)), x)
    assert gx.shape == x.shape and relative_error(gx, num) < 1e-7
    lin = m[1]
    w = lin.weight.data
    lin.weight.grad = None
    m(x)
    m.backward(gy)
    assert relative_error(lin.weight.grad, numeric_grad(lambda _: float(np.sum(m(x) * gy)), w)) < 1e-7


def test_gradients_accumulate_until_zero_grad(rng):
    m = nn.Sequential(nn.Conv2d(2, 3, 3, dtype=np.float64, rng=0), nn.Flatten(), nn.Linear(3 * 3 * 3, 2, dtype=np.float64, rng=1))
    x, gy = randn(rng, (2, 2, 5, 5), np.float64), randn(rng, (2, 2), np.float64)
    m(x)
    m.backward(gy)
    once = [p.grad.copy() for p in m.parameters()]
    m(x)
    m.backward(gy)
    for g1, p in zip(once, m.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g1, rtol=1e-12)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


class _Keeps(nn.Module):
    """A user's module whose backward returns an array it keeps."""

    def forward(self, x):
        return x

    def backward(self, grad_output, need_input_grad=True):
        self.kept = grad_output.copy()
        return self.kept


@pytest.mark.parametrize("tail", ["conv+relu", "relu", "kept"])
def test_sequential_writes_relu_gradients_only_over_its_own_arrays(rng, tail):
    """relu's gradient is written over arrays that a built-in module's backward
    made, never over the caller's grad_output or an array another module holds."""
    layers = [nn.Conv2d(2, 3, 3, padding=1, rng=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 5, rng=2)]
    layers += {"conv+relu": [], "relu": [nn.ReLU()], "kept": [nn.ReLU(), _Keeps()]}[tail]
    if tail == "conv+relu":
        layers = [nn.Conv2d(2, 3, 3, padding=1, rng=1), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = randn(rng, (2, 2, 4, 4), np.float32)
    y = model(x)
    gy = randn(rng, y.shape, np.float32)
    keep = gy.copy()
    g1 = model.backward(gy)
    np.testing.assert_array_equal(gy, keep)  # the caller's array is untouched
    if tail == "kept":
        np.testing.assert_array_equal(layers[-1].kept, keep)
    grads1 = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    g2 = model.backward(keep.copy())
    np.testing.assert_array_equal(g1, g2)
    for a, b in zip(grads1, (p.grad for p in model.parameters())):
        np.testing.assert_array_equal(a, b)
    # and the result is relu's gradient, checked against the layers run one by one
    assert_close(g1, _unfused_backward(layers, x, keep), np.float32, "input gradient")


def _unfused_backward(layers, x, gy):
    """The same layers' input gradient, run one module at a time without reuse."""
    h = x
    for m in layers:
        h = m.forward(h)
    g = gy
    for m in reversed(layers):
        g = m.backward(g.copy())
    return g


def test_channels_last_model_trains_as_the_nchw_one():
    """model.to(memory_format="channels_last"): the convs give channels_last
    outputs (the layers after them run on that layout), with the same losses,
    gradients and steps as the NCHW model; "contiguous" undoes it."""
    from convkern import layout

    x, y = nn_cases.data(np.float32)
    state = nn_cases.convkern_model(np.float32).state_dict()
    models = [nn_cases.convkern_model(np.float32) for _ in range(2)]
    for m in models:
        m.load_state_dict(state)
    assert models[1].to(memory_format="channels_last") is models[1]
    assert layout.is_channels_last(models[1][0](x)) and not layout.is_channels_last(models[0][0](x))
    opts = [nn.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for _ in range(3):
        losses = []
        for m, opt in zip(models, opts):
            crit = nn.CrossEntropyLoss()
            opt.zero_grad()
            losses.append(crit(m(x), y))
            m.backward(crit.backward(), need_input_grad=False)
            opt.step()
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    models[1].to(memory_format="contiguous")
    assert not layout.is_channels_last(models[1][0](x))
    with pytest.raises(ValueError, match="memory_format must be 'contiguous' or 'channels_last', got 'nhwc'"):
        models[1].to(memory_format="nhwc")


def test_dropout_train_and_eval(rng):
    x = randn(rng, (200, 50), np.float32) + 3.0
    d = nn.Dropout(0.3, rng=1)
    y = d(x)
    kept = y != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-6)
    g = d.backward(np.ones_like(x))
    np.testing.assert_array_equal(g != 0, kept)
    d.eval()
    assert d(x) is x
    assert np.all(nn.Dropout(1.0).train()(x) == 0)


def test_dropout2d_drops_whole_maps(rng):
    x = randn(rng, (8, 16, 5, 5), np.float32) + 5.0
    y = nn.Dropout2d(0.5, rng=2)(x)
    per_map = (y != 0).reshape(8, 16, -1)
    assert np.all(per_map.all(axis=2) | ~per_map.any(axis=2))  # each map all kept or all dropped
    assert 0.25 < per_map.all(axis=2).mean() < 0.75
    with pytest.raises(ValueError, match=r"Dropout2d: input must be \(N, C, H, W\)"):
        nn.Dropout2d(0.5)(np.ones((3, 4), np.float32))


def test_eval_mode_keeps_nothing_and_backward_says_so(rng):
    m = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.ReLU(), nn.MaxPool2d(2)).eval()
    y = m(randn(rng, (1, 1, 6, 6), np.float32))
    with pytest.raises(RuntimeError, match="no saved forward pass"):
        m.backward(np.ones_like(y))


def _quadratic_problem(opt_factory):
    """Minimise |p - target|^2 with an optimizer: its loss must fall."""
    p = nn.Parameter(np.zeros(5))
    target = np.arange(5.0)
    opt = opt_factory([p])
    losses = []
    for _ in range(200):
        p.grad = 2 * (p.data - target)
        losses.append(float(np.sum((p.data - target) ** 2)))
        opt.step()
    return losses


@pytest.mark.parametrize("factory", [
    lambda ps: nn.SGD(ps, lr=0.05), lambda ps: nn.SGD(ps, lr=0.02, momentum=0.9, nesterov=True),
    lambda ps: nn.Adam(ps, lr=0.1), lambda ps: nn.AdamW(ps, lr=0.1, weight_decay=1e-3)],
    ids=["sgd", "nesterov", "adam", "adamw"])
def test_optimizers_minimise(factory):
    losses = _quadratic_problem(factory)
    assert losses[-1] < 1e-3 * losses[0]


def _sgd_reference(p, grads, lr, momentum, dampening, weight_decay, nesterov):
    """PyTorch's SGD rule, step by step, in float64."""
    p, buf = p.astype(np.float64), None
    for g in grads:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3, weight_decay=1e-2),
                                dict(momentum=0.8, nesterov=True, weight_decay=5e-3)],
                         ids=["plain", "momentum", "dampening+decay", "nesterov+decay"])
def test_sgd_one_pass_update_follows_the_rule(dtype, rng, kw):
    from convkern.nn import optim

    p0 = rng.standard_normal((5, 4099)).astype(dtype)  # several of the kernel's chunks, and a ragged last one
    grads = [rng.standard_normal(p0.shape).astype(dtype) for _ in range(4)]
    want = _sgd_reference(p0, grads, 0.05, kw.get("momentum", 0.0), kw.get("dampening", 0.0),
                          kw.get("weight_decay", 0.0), kw.get("nesterov", False))
    fused, numpy_path = nn.Parameter(p0.copy()), nn.Parameter(p0.copy())
    opt_f, opt_n = nn.SGD([fused], lr=0.05, **kw), nn.SGD([numpy_path], lr=0.05, **kw)
    assert optim._one_pass("sgd_update", fused.data, grads[0]) is not None, "the cpp one-pass update is not taken"
    for g in grads:
        fused.grad = g.copy()
        numpy_path.grad = np.repeat(g, 2, axis=1)[:, ::2]  # a strided view: the NumPy expressions run
        assert optim._one_pass("sgd_update", numpy_path.data, numpy_path.grad) is None
        opt_f.step()
        opt_n.step()
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for got in (fused.data, numpy_path.data):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    if kw.get("momentum"):
        np.testing.assert_allclose(opt_f.state[0]["momentum_buffer"], opt_n.state[0]["momentum_buffer"],
                                   rtol=tol, atol=tol)


def test_optimizer_argument_errors():
    ps = [nn.Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="Nesterov"):
        nn.SGD(ps, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be > 0"):
        nn.Adam(ps, lr=0)
    with pytest.raises(ValueError, match="no parameters"):
        nn.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        nn.Adam(ps, betas=(1.0, 0.9))


def _lrs(make_schedule, lr: float, epochs: int):
    opt = nn.SGD([nn.Parameter(np.zeros(1))], lr=lr)
    sched = make_schedule(opt)
    out = []
    for _ in range(epochs):
        sched.step()
        out.append(opt.lr)
    return out


def test_schedules():
    assert _lrs(lambda o: nn.StepLR(o, step_size=2, gamma=0.5), 1.0, 5) == [1.0, 0.5, 0.5, 0.25, 0.25]
    got = _lrs(lambda o: nn.CosineAnnealingLR(o, T_max=4, eta_min=0.01), 0.1, 4)
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert abs(got[-1] - 0.01) < 1e-12


@pytest.mark.torch
def test_schedules_match_torch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    for ours_f, theirs_f in ((lambda o: nn.StepLR(o, 3, 0.3), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.3)),
                             (lambda o: nn.CosineAnnealingLR(o, 7, 1e-3),
                              lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7, 1e-3))):
        opt = nn.SGD([nn.Parameter(np.zeros(1))], lr=0.2)
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        ours, theirs = ours_f(opt), theirs_f(topt)
        for _ in range(7):
            topt.step()
            ours.step()
            theirs.step()
            assert abs(opt.lr - topt.param_groups[0]["lr"]) < 1e-12


def test_state_dict_names_shapes_and_mismatch_errors():
    m = nn_cases.convkern_model(np.float32)
    sd = m.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "10.weight", "10.bias"]
    assert sd["7.weight"].shape == (16, 54)
    other = nn_cases.convkern_model(np.float32, seed=99)
    other.load_state_dict(sd)
    for (k, a), b in zip(sd.items(), other.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    bad = dict(sd, **{"7.weight": np.zeros((16, 55), np.float32)})
    with pytest.raises(ValueError, match=r"7.weight: the model has shape \(16, 54\), the state has \(16, 55\)"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing keys: 0.bias"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="unexpected keys: extra"):
        other.load_state_dict(dict(sd, extra=np.zeros(1)))


def test_save_load_round_trip_and_bad_files(tmp_path):
    model = nn.build("small", (1, 12, 12), 3, rng=4)
    x = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    path = nn.save(tmp_path / "m.npz", model, dict(arch="small", input_shape=[1, 12, 12], num_classes=3))
    loaded, header = nn.load_model(path)
    assert header["format"] == "convkern-model" and header["version"] == 1
    np.testing.assert_array_equal(model.eval()(x), loaded(x))
    wrong = nn.build("small", (1, 16, 16), 3, rng=4)
    with pytest.raises(ValueError, match="does not match the model"):
        nn.load_into(wrong, path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        nn.load_model(tmp_path / "junk.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a convkern model file"):
        nn.load_model(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        nn.load_model(tmp_path / "missing.npz")


def test_builders_check_their_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'vgg99'"):
        nn.build("vgg99", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="too small for this architecture"):
        nn.build("lenet5", (1, 6, 6), 10)
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"Linear: input must be \(N, 4\)"):
        nn.Linear(4, 2)(np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        nn.Linear(4, 2, dtype=np.int32)


@pytest.mark.parametrize("arch", sorted(nn.ARCHITECTURES))
def test_architectures_forward_backward_shapes(arch, dtype, rng):
    model = nn.build(arch, (1, 28, 28), 10, dtype=dtype, rng=0)
    assert model.training
    x = rng.random((3, 1, 28, 28)).astype(dtype)
    y = model(x)
    assert y.shape == (3, 10) and y.dtype == dtype
    gx = model.backward(np.ones_like(y))
    assert gx.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
