"""Training learns (loss falls, accuracy far above chance, in seconds), and the
train / predict / featuremaps commands produce what they promise."""

from __future__ import annotations

import json

import numpy as np
import pytest

import convkern.nn as nn
from convkern.cli import main
from convkern.data import Augment, batches, make_shapes
from convkern.app.train import TrainConfig, fit


def test_small_cnn_learns_shapes_in_a_few_seconds():
    train, test = make_shapes(600, size=20, seed=1), make_shapes(150, size=20, seed=2)
    mean, std = train.images.mean(), train.images.std()
    model = nn.build("small", (1, 20, 20), 3, rng=0, dropout=0.1)
    crit, opt = nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(0)
    epoch_loss = []
    for _ in range(10):
        losses = []
        for x, y in batches(train.images, train.labels, 32, shuffle=True, rng=rng):
            x = (x - mean) / std
            opt.zero_grad()
            losses.append(float(crit(model(x), y)))
            model.backward(crit.backward(), need_input_grad=False)
            opt.step()
        epoch_loss.append(np.mean(losses))
    model.eval()
    acc = np.mean(model((test.images - mean) / std).argmax(1) == test.labels)
    assert epoch_loss[-1] < 0.5 * epoch_loss[0], epoch_loss
    assert acc > 0.85, f"test accuracy {acc:.3f} (chance is 0.33)"


def test_fit_writes_model_metrics_and_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the train extra)")
    cfg = TrainConfig(data="shapes", arch="small", epochs=2, shapes_train=300, image_size=16, out=str(tmp_path),
                      optimizer="adam", progress=False, augment=Augment(crop_padding=1, noise=0.02))
    result = fit(cfg, log=lambda *_: None)
    for name in ("model.npz", "last.npz", "metrics.json", "curves.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert len(saved["history"]) == 2 and saved["test"]["accuracy"] == result["test"]["accuracy"]
    assert np.array(saved["confusion_matrix"]).sum() == 75
    model, header = nn.load_model(tmp_path / "model.npz")
    assert header["classes"] == ["triangle", "square", "circle"] and header["input_shape"] == [1, 16, 16]


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    def log(msg):
        if msg.startswith("epoch 1:"):
            raise KeyboardInterrupt

    cfg = TrainConfig(arch="small", epochs=5, shapes_train=120, image_size=12, out=str(tmp_path), progress=False)
    result = fit(cfg, log=log)
    assert result["interrupted"] and len(result["history"]) == 1
    assert nn.load_model(tmp_path / "last.npz")[1]["epoch"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["interrupted"]


def test_cli_train_predict_featuremaps(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the train extra")
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the train extra)")
    out = tmp_path / "run"
    rc = main(["train", "--arch", "small", "--epochs", "2", "--shapes-train", "240", "--image-size", "16",
               "--out", str(out), "--no-progress", "--seed", "3"])
    assert rc == 0
    assert "test (60 images, best model)" in capsys.readouterr().out
    img = make_shapes(1, size=40, seed=9)  # another size: predict resizes
    path = tmp_path / "shape.png"
    Image.fromarray((img.images[0, 0] * 255).astype(np.uint8)).save(path)
    assert main(["predict", str(out / "model.npz"), str(path)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{path}: ") and any(c in line for c in ("triangle", "square", "circle"))
    png = tmp_path / "maps.png"
    assert main(["featuremaps", str(out / "model.npz"), str(path), "--out", str(png)]) == 0
    assert png.stat().st_size > 0 and "conv 2" in capsys.readouterr().out


def test_feature_maps_are_scaled_to_0_255(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the train extra")
    from convkern.app.inference import feature_maps

    model = nn.build("lenet", (1, 28, 28), 3, rng=0)
    nn.save(tmp_path / "m.npz", model, dict(arch="lenet", input_shape=[1, 28, 28], num_classes=3,
                                            normalisation={"mean": [0.2], "std": [0.3]}))
    Image.fromarray((make_shapes(1, seed=1).images[0, 0] * 255).astype(np.uint8)).save(tmp_path / "x.png")
    _, layers = feature_maps(tmp_path / "m.npz", tmp_path / "x.png")
    assert [m.shape for _, m in layers] == [(32, 28, 28), (64, 14, 14)]
    for _, maps in layers:
        assert maps.dtype == np.uint8
        varied = np.ptp(maps.reshape(len(maps), -1), axis=1) > 0
        assert np.all(maps.reshape(len(maps), -1)[varied].max(axis=1) == 255)
        assert np.all(maps.reshape(len(maps), -1)[varied].min(axis=1) == 0)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--data", "nonsense", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown data 'nonsense'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "none.npz"), "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_train_runs_and_reports(capsys):
    assert main(["bench-train", "--rounds", "1", "--batch", "4", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert "convkern cpp" in out and "train step" in out and "inference b4" in out
    assert out.startswith("machine: ") and "GEMM blocking KC" in out and "BLAS SGEMM" in out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_stop_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, optimizer):
    """Optimizer state, schedule, data order, augmentation and dropout masks all carry over."""
    base = dict(arch="small", epochs=3, shapes_train=200, image_size=12, progress=False, optimizer=optimizer,
                schedule="step", augment=Augment(crop_padding=1, hflip=True, noise=0.05))
    fit(TrainConfig(out=str(tmp_path / "full"), **base), log=lambda *_: None)
    part = fit(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **base), log=lambda *_: None)
    assert part["stopped"] and len(part["history"]) == 1
    resumed = fit(TrainConfig(resume=str(tmp_path / "part"), epochs=99, progress=False), log=lambda *_: None)
    assert resumed["config"]["epochs"] == 3, "a resumed run keeps its saved config"
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    a, b = (nn.serialize.read(tmp_path / d / "last.npz")[1] for d in ("full", "part"))
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in resumed["history"]]


def test_checkpoint_round_trips_optimizer_state(tmp_path):
    rng = np.random.default_rng(0)
    model = nn.build("small", (1, 12, 12), 3, rng=0)
    opt = nn.Adam(model.parameters(), lr=3e-3)
    sched = nn.StepLR(opt, step_size=1, gamma=0.5)
    crit = nn.CrossEntropyLoss()
    x, y = rng.standard_normal((6, 1, 12, 12)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        opt.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward(), need_input_grad=False)
        opt.step()
    sched.step()
    nn.save_checkpoint(tmp_path / "c.npz", model, opt, sched,
                       {"epoch": 1, "arch": "small", "input_shape": [1, 12, 12], "num_classes": 3})
    model2 = nn.build("small", (1, 12, 12), 3, rng=1)
    opt2 = nn.Adam(model2.parameters())
    sched2 = nn.StepLR(opt2, step_size=1, gamma=0.5)
    header = nn.load_checkpoint(tmp_path / "c.npz", model2, opt2, sched2)
    assert header["epoch"] == 1 and sched2.epoch == 1 and opt2.lr == opt.lr == 1.5e-3
    for i, st in opt.state.items():
        assert opt2.state[i]["step"] == st["step"] == 3
        for k in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(opt2.state[i][k], st[k]) and opt2.state[i][k].dtype == np.float32
    for (k, v), (_, w) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert np.array_equal(v, w), k
    with pytest.raises(ValueError, match="holds Adam state; the optimizer is SGD"):
        nn.load_checkpoint(tmp_path / "c.npz", model2, nn.SGD(model2.parameters(), lr=0.1))
    nn.save(tmp_path / "m.npz", model)
    with pytest.raises(ValueError, match="without optimizer state"):
        nn.load_checkpoint(tmp_path / "m.npz", model2, opt2)
    assert nn.load_model(tmp_path / "c.npz")[0].num_parameters() == model.num_parameters()


def test_resume_from_a_directory_without_a_checkpoint_is_clear(tmp_path):
    with pytest.raises(ValueError, match="cannot resume from .*does not exist"):
        fit(TrainConfig(resume=str(tmp_path), progress=False), log=lambda *_: None)
