"""convkern.torch, op by op: values and memory formats against torch's own
functional ops, gradcheck in float64 on awkward geometry, the ops' torch.library
registration (opcheck), zero-copy crossing, errors, and other backends
through the same ops. Skipped, saying why, where torch is not installed."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: convkern.torch needs it")
pytestmark = pytest.mark.torch

import torch.nn.functional as TF  # noqa: E402

import convkern  # noqa: E402
import convkern.torch as ckt  # noqa: E402
from convkern import tune  # noqa: E402
from convkern.torch import ops  # noqa: E402
from torch_cases import randn, rel  # noqa: E402

# (kwargs, input shape, weight shape): stride > kernel, dilation, groups,
# asymmetric and "same" padding, batch 1, 1x1 images
CONV_CASES = [
    (dict(stride=3), (2, 3, 8, 7), (4, 3, 2, 2)),
    (dict(padding=(2, 1), dilation=(2, 1)), (1, 2, 7, 9), (3, 2, 3, 3)),
    (dict(groups=2, padding=1, stride=(2, 1)), (2, 4, 6, 5), (6, 2, 3, 3)),
    (dict(padding="same", dilation=(1, 2)), (1, 3, 5, 6), (2, 3, 4, 3)),
    (dict(padding="valid"), (2, 2, 4, 4), (3, 2, 4, 1)),
    (dict(groups=3, padding=1), (1, 3, 5, 5), (3, 1, 3, 3)),
    (dict(), (3, 2, 1, 1), (4, 2, 1, 1)),
]
MAX_CASES = [
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 3, 7, 8)),
    (dict(kernel_size=(2, 3), stride=(3, 1), dilation=(2, 1)), (1, 2, 9, 6)),
    (dict(kernel_size=2, stride=4), (2, 2, 9, 9)),
    (dict(kernel_size=1), (1, 2, 1, 1)),
]
AVG_CASES = [
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 3, 7, 8)),
    (dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), divisor_override=5), (1, 2, 6, 7)),
    (dict(kernel_size=3, stride=4, ceil_mode=True), (2, 1, 10, 10)),
    (dict(kernel_size=1), (1, 2, 1, 1)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's, about its own copy
@pytest.mark.parametrize("kw,xs,ws", CONV_CASES)
def test_conv2d_gradcheck(kw, xs, ws):
    x, w, b = randn(*xs, grad=True), randn(*ws, seed=1, grad=True), randn(ws[0], seed=2, grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ckt.conv2d(x, w, b, **kw), (x, w, b))
    assert rel(ckt.conv2d(x, w, b, **kw), TF.conv2d(x, w, b, **kw)) < 1e-13


@pytest.mark.parametrize("kw,xs", MAX_CASES)
def test_max_pool2d_gradcheck(kw, xs):
    x = randn(*xs, grad=True)
    assert torch.autograd.gradcheck(lambda x: ckt.max_pool2d(x, **kw), (x,))
    y, ind = ckt.max_pool2d(x, **kw, return_indices=True)
    want, want_ind = TF.max_pool2d(x, **kw, return_indices=True)
    assert torch.equal(y, want) and torch.equal(ind, want_ind)


@pytest.mark.parametrize("kw,xs", AVG_CASES)
def test_avg_pool2d_gradcheck(kw, xs):
    x = randn(*xs, grad=True)
    assert torch.autograd.gradcheck(lambda x: ckt.avg_pool2d(x, **kw), (x,))
    assert rel(ckt.avg_pool2d(x, **kw), TF.avg_pool2d(x, **kw)) < 1e-14


def test_relu_gradcheck_and_inplace():
    x = randn(2, 3, 4, 5, grad=True)
    with torch.no_grad():
        x[0, 0, 0, :2] = torch.tensor([0.0, float("nan")])  # the kink and NaN pass as torch's do
    y = ckt.relu(x)
    assert torch.equal(y.isnan(), x.isnan()) and torch.equal(torch.nan_to_num(y), torch.nan_to_num(TF.relu(x)))
    smooth = randn(3, 4, seed=3, grad=True)  # any shape; away from the kink
    assert torch.autograd.gradcheck(lambda t: ckt.relu(t + 0.01 * torch.sign(t)), (smooth,))
    a = randn(2, 3, 4, 4, seed=4, grad=True)
    h = a * 1.0
    out = ckt.relu(h, inplace=True)
    assert out is h and torch.equal(h, TF.relu(a.detach()))
    out.sum().backward()
    assert torch.equal(a.grad, (a > 0).to(a.dtype))
    leaf = randn(3, seed=5, grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        ckt.relu(leaf, inplace=True)  # as torch refuses an in-place op on a leaf that needs grad


@pytest.mark.parametrize("output_size", [1, (2, 3), (None, 2)])
def test_adaptive_avg_pool2d(output_size):
    x = randn(2, 3, 6, 6, grad=True)
    assert rel(ckt.adaptive_avg_pool2d(x, output_size), TF.adaptive_avg_pool2d(x, output_size)) < 1e-14
    assert torch.autograd.gradcheck(lambda t: ckt.adaptive_avg_pool2d(t, output_size), (x,))
    odd = randn(1, 2, 7, 5)  # 7 is not a multiple of 2: torch's own kernel runs
    assert torch.equal(ckt.adaptive_avg_pool2d(odd, (2, 2)), TF.adaptive_avg_pool2d(odd, (2, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_channels_last_in_gives_channels_last_out(dtype):
    cl = torch.channels_last
    x = randn(2, 4, 9, 8, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    w = randn(6, 4, 3, 3, dtype=dtype, seed=1, grad=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    for ours, theirs in [(ckt.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1)),
                         (ckt.max_pool2d(x, 2), TF.max_pool2d(x, 2)),
                         (ckt.avg_pool2d(x, 3, 2, 1), TF.avg_pool2d(x, 3, 2, 1)),
                         (ckt.relu(x), TF.relu(x))]:
        assert ours.is_contiguous(memory_format=cl) == theirs.is_contiguous(memory_format=cl)
        assert ours.stride() == theirs.stride()
        assert rel(ours, theirs) <= tol
        gy = randn(*ours.shape, dtype=dtype, seed=9)
        g1, = torch.autograd.grad(ours, x, gy)
        g2, = torch.autograd.grad(theirs, x, gy)
        assert rel(g1, g2) <= tol


# inputs of both layouts at once (one channel; 1x1 planes) and an NCHW one,
# each against weights C-contiguous and made channels_last: torch's conv
# output takes the weight's layout where the input's is ambiguous
BOTH_LAYOUT_CONVS = [((2, 1, 9, 8), (5, 1, 3, 3), dict(padding=1)),
                     ((3, 6, 1, 1), (4, 6, 1, 1), {}),
                     ((2, 1, 7, 7), (3, 1, 5, 5), dict(padding=2, stride=2)),
                     ((2, 3, 6, 6), (4, 3, 3, 3), {})]


@pytest.mark.parametrize("case", BOTH_LAYOUT_CONVS, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("weights", ["contiguous", "channels_last"])
@pytest.mark.parametrize("inputs", ["contiguous", "channels_last"])
def test_conv_output_layout_follows_torch_for_inputs_of_both_layouts(case, weights, inputs):
    xs, ws, kw = case
    x = randn(*xs, dtype=torch.float32)
    w = randn(*ws, dtype=torch.float32, seed=1)
    if inputs == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if weights == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    ours, theirs = ckt.conv2d(x, w, **kw), TF.conv2d(x, w, **kw)
    assert ours.stride() == theirs.stride(), f"ours {ours.stride()}, torch's {theirs.stride()}"
    assert rel(ours, theirs) <= 1e-5
    gy = randn(*ours.shape, dtype=torch.float32, seed=9)
    for a, b in zip(torch.autograd.grad(ours, (x, w), gy), torch.autograd.grad(theirs, (x, w), gy)):
        assert rel(a, b) <= 1e-5


def test_a_channels_last_lenet_on_one_channel_images_stays_channels_last():
    """A channels_last model's first conv on a one-channel image (both
    layouts) gives channels_last, as torch's does, so the layers after it
    run on the channels_last kernels rather than NCHW ones."""
    from convkern.torch.nets import LeNet

    torch.manual_seed(3)
    model = LeNet().to(memory_format=torch.channels_last).eval()  # (eval: no dropout masks to differ)
    ours = ckt.patch(LeNet()).to(memory_format=torch.channels_last).eval()
    ours.load_state_dict(model.state_dict())
    x = randn(4, 1, 28, 28, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    seen, want = [], []
    for net, log in ((ours, seen), (model, want)):
        net.features[2].register_forward_hook(lambda m, i, o, log=log: log.append(o.stride()))
        with tune.forced("off"):
            net(x).square().sum().backward()
    assert seen == want and ours.features[2](ours.features[0](x)).is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(ours.named_parameters(), model.parameters()):
        assert rel(p.grad, q.grad) <= 1e-4, name


def test_cpu_tensors_cross_without_copies():
    t = randn(2, 3, 4, 5, dtype=torch.float32)
    a = ops.to_array(t)
    assert isinstance(a, np.ndarray) and a.ctypes.data == t.data_ptr()
    back = ops.from_array(a)
    assert back.data_ptr() == t.data_ptr()
    cl = t.contiguous(memory_format=torch.channels_last)
    # relu runs on a channels_last tensor in its own memory order: no conversion either way
    assert ops.to_array(cl.permute(0, 2, 3, 1)).flags.c_contiguous


def test_opcheck_every_op():
    x = randn(2, 3, 7, 6, grad=True)
    w = randn(4, 3, 3, 3, seed=1, grad=True)
    b = randn(4, seed=2, grad=True)
    cases = [(ops.conv2d.op, (x, w, b, [2, 1], [1, 0], False, [1, 1], 1, "auto", "")),
             (ops.conv2d.op, (x, w, None, [1, 1], [0, 0], True, [1, 2], 1, "im2col", "")),
             (ops.max_pool2d.op, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, "")),
             (ops.avg_pool2d.op, (x, [2, 3], [2, 2], [1, 0], False, False, None, "")),
             (ops.relu.op, (x, ""))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("fn", ["conv2d", "conv2d_relu"])
def test_only_requested_gradients_are_computed(monkeypatch, fn):
    asked = []
    real = convkern.functional.conv2d_backward

    def spy(*args, needs, **kw):
        asked.append(tuple(needs))
        return real(*args, needs=needs, **kw)

    monkeypatch.setattr(ops.ck, "conv2d_backward", spy)
    x, w, b = randn(1, 2, 5, 5), randn(3, 2, 3, 3, seed=1, grad=True), randn(3, seed=2)
    getattr(ckt, fn)(x, w, b, padding=1).sum().backward()
    assert asked == [(False, True, False)] and w.grad is not None


@pytest.mark.parametrize("backend", ["reference", "numba", "cuda-emu", "cupy-emu"])
def test_other_backends_through_the_ops(backend):
    info = {b.name: b for b in convkern.backends()}.get(backend)
    if info is None or not info.available:
        pytest.skip(f"backend {backend} unavailable: {info.reason if info else 'not registered'}")
    x, w = randn(2, 3, 6, 7, grad=True), randn(4, 3, 3, 3, seed=1, grad=True)
    y = ckt.relu(ckt.max_pool2d(ckt.conv2d(x, w, padding=1, backend=backend), 2, backend=backend), backend=backend)
    want = TF.relu(TF.max_pool2d(TF.conv2d(x, w, padding=1), 2))
    gy = randn(*y.shape, seed=7)
    got, expect = torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(want, (x, w), gy)
    assert rel(y, want) < 1e-12 and all(rel(a, b) < 1e-12 for a, b in zip(got, expect))


def test_errors_match_convkern_functional():
    x, w = randn(1, 3, 5, 5), randn(4, 2, 3, 3)
    with pytest.raises(ValueError) as ours:
        ckt.conv2d(x, w)
    with pytest.raises(ValueError) as theirs:
        convkern.conv2d(x.numpy(), w.numpy())
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="padding"):
        ckt.max_pool2d(randn(1, 1, 4, 4), 2, padding=2)
    with pytest.raises(TypeError, match="torch.int64"):
        ckt.relu(torch.arange(4))
    with pytest.raises(TypeError, match="float32 but input has dtype torch.float64|has dtype torch.float32"):
        ckt.conv2d(x, w.float())
    with pytest.raises(TypeError, match="meta"):
        ckt.conv2d(x, torch.empty(4, 3, 3, 3, device="meta", dtype=torch.float64))
    with pytest.raises(ValueError, match="algo"):
        ckt.conv2d(x, randn(4, 3, 3, 3), algo="fft")
    with pytest.raises(RuntimeError, match="floating point"):
        torch.arange(3).requires_grad_()  # torch's own, clear refusal


def test_double_backward_is_a_clear_error():
    x, w = randn(1, 1, 5, 5, grad=True), randn(1, 1, 3, 3, seed=1, grad=True)
    gx, = torch.autograd.grad(ckt.conv2d(x, w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_import_without_torch_says_what_to_install(tmp_path):
    code = "import sys; sys.modules['torch'] = None\nimport convkern\ntry:\n    import convkern.torch\n" \
           "except ImportError as e:\n    print('IMPORTERROR', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert "IMPORTERROR" in out.stdout and "pip install torch" in out.stdout, out.stdout + out.stderr


def test_kernels_take_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ckt.relu(randn(4, 4))
        assert convkern.get_num_threads() == 1
        torch.set_num_threads(2)
        ckt.conv2d(randn(1, 1, 4, 4), randn(1, 1, 3, 3))
        assert convkern.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_registered_ops_have_the_eager_paths_gradients():
    """Eager calls skip the dispatcher (ops.Op.call); the registered ops, which
    compiled and exported code runs, must give the same values and gradients."""
    x, w, b = randn(2, 3, 7, 6, grad=True), randn(4, 3, 3, 3, seed=1, grad=True), randn(4, seed=2, grad=True)
    cases = [(ops.conv2d, (x, w, b, [2, 1], [1, 2], False, [1, 1], 1, "auto", "")),
             (ops.conv2d, (x, w, None, [1, 1], [0, 0], True, [2, 1], 1, "direct", "")),
             (ops.max_pool2d, (x, [3, 2], [2, 2], [1, 1], [1, 2], True, "")),
             (ops.avg_pool2d, (x, [2, 3], [2, 1], [1, 1], True, False, 5, "")),
             (ops.relu, (x, ""))]
    for op, args in cases:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 - max_pool2d's indices
        eager, registered = first(op.call(*args)), first(op.op(*args))
        assert torch.equal(eager, registered)
        gy = randn(*eager.shape, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(eager, tensors, gy),
                                                      torch.autograd.grad(registered, tensors, gy)))
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def through_registered(*t, op=op, args=args, slots=slots):
            filled = list(args)
            for i, v in zip(slots, t):
                filled[i] = v
            return first(op.op(*filled))

        assert torch.autograd.gradcheck(through_registered, tuple(tensors))


def test_channels_last_tensors_cross_without_copies(monkeypatch):
    """A channels_last model on cpp: every conv and pool reads the tensor's
    memory as it lies (layout.nhwc returns views) and returns channels_last."""
    from convkern import layout

    copies = []
    real = layout.nhwc

    def watching(a):
        out = real(a)
        copies.append(not np.shares_memory(out, a))
        return out

    monkeypatch.setattr(layout, "nhwc", watching)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.AvgPool2d(2))
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    want = model(x)
    ckt.patch(model)
    with tune.forced("off"):
        got = model(x.requires_grad_())
        got.backward(torch.randn_like(got))  # channels_last, as torch makes it
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert copies and not any(copies), f"{sum(copies)} of {len(copies)} NHWC crossings copied"


def test_inplace_relu_without_grad_still_bumps_the_version():
    """The no-grad in-place relu writes through NumPy, behind autograd's
    back: it bumps the tensor's version, so a backward that saved the tensor
    refuses instead of using the overwritten values."""
    a = torch.randn(5, requires_grad=True)
    b = torch.randn(5)
    c = a * b  # saves b for a's gradient
    before = b._version
    out = ckt.relu(b, inplace=True)
    assert out is b and b._version > before and bool((b >= 0).all())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()


def test_inplace_relu_writes_through_any_dense_layout():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    want = torch.relu(x)
    ptr = x.data_ptr()
    assert ckt.relu(x, inplace=True) is x and x.data_ptr() == ptr
    torch.testing.assert_close(x, want)
    assert x.is_contiguous(memory_format=torch.channels_last)
