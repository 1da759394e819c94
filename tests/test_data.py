"""Datasets, loaders (with malformed files), splitting, batching, augmentation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from convkern.data import Augment, Dataset, batches, load_digits, load_folder, load_idx, make_shapes, read_idx, split


def test_shapes_reproducible_balanced_and_in_range():
    a, b = make_shapes(60, seed=4), make_shapes(60, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, make_shapes(60, seed=5).images)
    assert a.images.shape == (60, 1, 28, 28) and a.images.dtype == np.float32
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert a.class_counts().tolist() == [20, 20, 20] and a.classes == ["triangle", "square", "circle"]
    rgb = make_shapes(9, size=32, channels=3, seed=1)
    assert rgb.images.shape == (9, 3, 32, 32)
    with pytest.raises(ValueError, match="channels must be 1"):
        make_shapes(3, channels=2)


def test_shapes_draw_what_they_say():
    """Noise-free outlines: a circle's ink lies near its radius; a filled shape
    covers more area than its outline."""
    d = make_shapes(300, size=40, seed=2, noise=0.0, fill_fraction=0.0)
    filled = make_shapes(300, size=40, seed=2, noise=0.0, fill_fraction=1.0)
    ink = (d.images > d.images.reshape(300, -1).min(1)[:, None, None, None] + 0.05).mean(axis=(1, 2, 3))
    ink_filled = (filled.images > filled.images.reshape(300, -1).min(1)[:, None, None, None] + 0.05
                  ).mean(axis=(1, 2, 3))
    assert np.all(ink > 0.01) and np.all(ink_filled > ink)
    # a square's filled area is 2/pi of its circumscribed circle's, a triangle's 0.41
    areas = [ink_filled[filled.labels == c].mean() for c in range(3)]
    assert areas[0] < areas[1] < areas[2]


def test_digits():
    d = load_digits()
    assert d.images.shape == (1797, 1, 8, 8) and len(d.classes) == 10
    assert 0 <= d.images.min() and d.images.max() <= 1


def test_split_is_stratified_disjoint_and_seeded():
    d = make_shapes(90, seed=0)
    train, held = split(d, 0.2, seed=3)
    assert len(train) + len(held) == 90 and held.class_counts().tolist() == [6, 6, 6]
    both = np.concatenate([train.images, held.images]).reshape(90, -1)
    assert len(np.unique(both, axis=0)) == 90
    np.testing.assert_array_equal(split(d, 0.2, seed=3)[1].labels, held.labels)
    with pytest.raises(ValueError, match="fraction"):
        split(d, 1.0)


def test_batches_cover_everything_once():
    x, y = np.arange(10, dtype=np.float32)[:, None, None, None], np.arange(10)
    seen = np.concatenate([b for _, b in batches(x, y, 3, shuffle=True, rng=np.random.default_rng(0))])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert [len(b) for _, b in batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, y, 0))


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_idx_loader_plain_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, 7).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(imgs, 0x08))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x08)))
    d = load_idx(tmp_path)
    assert d.images.shape == (7, 1, 5, 6)
    np.testing.assert_allclose(d.images[:, 0] * 255, imgs)
    np.testing.assert_array_equal(d.labels, labels)
    f32 = rng.standard_normal((2, 3)).astype(np.float32)
    (tmp_path / "f.idx").write_bytes(_idx_bytes(f32, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), f32)


def test_idx_loader_rejects_malformed_files(tmp_path):
    good = _idx_bytes(np.zeros((2, 3, 3), np.uint8), 0x08)
    cases = {"magic": b"\x12\x34" + good[2:], "type": good[:2] + b"\x42" + good[3:], "short": good[:-1],
             "long": good + b"\x00", "empty": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="IDX|holds"):
            read_idx(tmp_path / name)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path)


def test_folder_loader(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the train extra")
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_folder(tmp_path, size=(16, 16))
    assert d.images.shape == (6, 1, 16, 16) and d.classes == ["cat", "dog"] and d.labels.tolist() == [0] * 3 + [1] * 3
    assert load_folder(tmp_path, size=(8, 10), channels=3).images.shape == (6, 3, 8, 10)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        load_folder(tmp_path)
    with pytest.raises(ValueError, match="at least two classes"):
        load_folder(tmp_path / "cat")


def test_dataset_checks_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        Dataset(np.zeros((2, 1, 3, 3)), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but labels"):
        Dataset(np.zeros((2, 1, 3, 3)), np.array([0]), ["a", "b"])


def test_augment_each_option(rng):
    x = make_shapes(16, seed=1).images
    assert Augment()(x, rng) is x  # nothing asked, nothing done
    for kw in (dict(crop_padding=3), dict(hflip=True), dict(rotate=20.0), dict(brightness=0.2),
               dict(contrast=0.3), dict(noise=0.05), dict(cutout=8)):
        y = Augment(**kw)(x, np.random.default_rng(5))
        assert y.shape == x.shape and y.dtype == np.float32, kw
        assert 0 <= y.min() and y.max() <= 1, kw
        assert not np.array_equal(y, x), kw
        np.testing.assert_array_equal(y, Augment(**kw)(x, np.random.default_rng(5)), err_msg=str(kw))
    flipped = Augment(hflip=True)(x, np.random.default_rng(0))
    same = [np.array_equal(f, o) or np.array_equal(f, o[:, :, ::-1]) for f, o in zip(flipped, x)]
    assert all(same)
    with pytest.raises(ValueError, match="rotate must be >= 0"):
        Augment(rotate=-1)
