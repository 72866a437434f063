"""Dataset loaders on small files written in the exact official formats (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmia import datasets as ds
from fedmia import io as fio
from fedmia import pipeline
from fedmia.config import DatasetConfig
from fedmia.datasets import prepare_dataset, seeded_split, verify_md5

# ----------------------------------------------------------------------------- helpers


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit Python 2 strings
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the official CIFAR pickles do."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_pickle(obj: object, path: Path) -> None:
    """Pickle like cPickle of Python 2 + numpy 1.x did (protocol 2, numpy.core globals)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


CIFAR_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver"] + [
    f"class_{i:02d}" for i in range(5, 100)]


def make_cifar(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """A tiny CIFAR-100 python release under ``root/cifar-100-python``; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        py2_pickle({
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": data,
        }, folder / split)
        out[split] = (data, fine)
    py2_pickle({b"fine_label_names": [n.encode() for n in CIFAR_NAMES],
                b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]},
               folder / "meta")
    return out


def cifar_tarball(tmp: Path) -> bytes:
    src = tmp / "src"
    make_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    return buf.getvalue()


def save_image(path: Path, mode: str, size: tuple[int, int], color, fmt: str | None = None,
               seed: int = 0) -> None:
    """A solid image (``color``) or, with ``color=None``, random noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3),
                                                   dtype=np.uint8)
        img = Image.fromarray(arr, "RGB").convert(mode)
    else:
        img = Image.new(mode, size, color)
    img.save(path, format=fmt)


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)


# ----------------------------------------------------------------------------- config


def test_config_accepts():
    cfg = DatasetConfig.from_dict({"kind": "cifar100", "root": "data", "download": True})
    assert (cfg.root, cfg.download) == ("data", True)
    assert DatasetConfig.from_dict({"kind": "fashion_mnist"}).root is None


# ----------------------------------------------------------------------------- CIFAR-100


def test_cifar100_layout_labels_classes(tmp_path):
    arrays = make_cifar(tmp_path)
    data = prepare_dataset(DatasetConfig(kind="cifar100", root=str(tmp_path)))
    x_tr, y_tr = arrays["train"]
    x_te, y_te = arrays["test"]
    assert data.images.shape == (17, 3, 32, 32) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.is_test.dtype == bool
    assert data.classes == CIFAR_NAMES
    np.testing.assert_array_equal(data.labels, y_tr + y_te)
    np.testing.assert_array_equal(data.is_test, [False] * 12 + [True] * 5)
    # row layout: 1024 R, 1024 G, 1024 B, each plane row-major
    for i, c, h, w in [(0, 0, 0, 0), (3, 1, 2, 5), (11, 2, 31, 0), (7, 2, 0, 31)]:
        assert data.images[i, c, h, w] == x_tr[i, c * 1024 + h * 32 + w]
    assert data.images[12 + 4, 1, 17, 9] == x_te[4, 1024 + 17 * 32 + 9]
    np.testing.assert_array_equal(data.images[:12], x_tr.reshape(12, 3, 32, 32))


def test_cifar100_resize_and_python3_pickles(tmp_path):
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-100-python"
    for name in ("train", "test", "meta"):  # re-pickle the way Python 3 would
        with open(folder / name, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    data = prepare_dataset(DatasetConfig(kind="cifar100", root=str(tmp_path), image_size=16))
    assert data.images.shape == (17, 3, 16, 16)


def test_verify_md5(tmp_path):
    f = tmp_path / "file.bin"
    f.write_bytes(b"hello")
    good = hashlib.md5(b"hello").hexdigest()
    verify_md5(f, good)
    verify_md5(f, good.upper())


def _fake_urlopen(payload: bytes | Exception, calls: list):
    def urlopen(url, timeout=None):
        calls.append(url)
        if isinstance(payload, Exception):
            raise payload
        return io.BytesIO(payload)

    return urlopen


def test_cifar100_download_ok(tmp_path, monkeypatch):
    tarball = cifar_tarball(tmp_path)
    root = tmp_path / "data"
    calls: list = []
    monkeypatch.setattr("urllib.request.urlopen", _fake_urlopen(tarball, calls))
    monkeypatch.setattr(ds, "CIFAR100_MD5", hashlib.md5(tarball).hexdigest())
    cfg = DatasetConfig(kind="cifar100", root=str(root), download=True)
    data = prepare_dataset(cfg)
    assert data.images.shape == (17, 3, 32, 32) and data.classes == CIFAR_NAMES
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python",
                                                     "cifar-100-python.tar.gz"]
    assert prepare_dataset(cfg).checksum() == data.checksum() and len(calls) == 1  # no re-fetch


def test_cifar100_hand_downloaded_archive(tmp_path, monkeypatch):
    tarball = cifar_tarball(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(tarball)
    cfg = DatasetConfig(kind="cifar100", root=str(root))
    monkeypatch.setattr(ds, "CIFAR100_MD5", hashlib.md5(tarball).hexdigest())
    assert len(prepare_dataset(cfg).labels) == 17


# ----------------------------------------------------------------------------- Dermnet

DERM = ["Acne and Rosacea Photos", "Eczema Photos", "Melanoma Skin Cancer Nevi and Moles"]


def make_dermnet(root: Path) -> None:
    """Mixed sizes and modes. The real Kaggle set holds JPEG files (``.jpg``) only; the PNG
    files here stand in for images with alpha or exact colours (JPEG cannot store either)."""
    tr, te = root / "train", root / "test"
    save_image(tr / DERM[0] / "a1.jpg", "RGB", (120, 80), None, seed=1)
    save_image(tr / DERM[0] / "a2.png", "RGB", (64, 64), (200, 10, 30))
    save_image(tr / DERM[0] / "a3.jpg", "L", (90, 130), None, seed=2)
    save_image(tr / DERM[1] / "e1.jpg", "CMYK", (70, 70), None, seed=3)
    save_image(tr / DERM[1] / "e2.png", "RGBA", (33, 47), (10, 20, 30, 255))
    save_image(tr / DERM[1] / "e3.png", "L", (100, 50), 128)
    save_image(tr / DERM[2] / "m1.jpg", "RGB", (300, 200), None, seed=4)
    save_image(tr / DERM[2] / "m2.JPG", "RGB", (64, 64), None, seed=5)
    # within-train duplicate (same bytes, same class)
    (tr / DERM[2] / "m3.jpg").write_bytes((tr / DERM[2] / "m1.jpg").read_bytes())
    save_image(te / DERM[0] / "t1.jpg", "RGB", (50, 50), None, seed=6)
    save_image(te / DERM[1] / "t2.jpg", "L", (80, 60), None, seed=7)
    save_image(te / DERM[2] / "t3.jpg", "RGB", (64, 100), None, seed=8)
    # across train/test duplicate: a test file with the bytes of a train file
    (te / DERM[0] / "t0.jpg").write_bytes((tr / DERM[0] / "a1.jpg").read_bytes())
    (te / DERM[0] / "notes.txt").write_text("not an image")
    (te / DERM[0] / ".hidden.jpg").write_bytes(b"junk")


def test_dermnet(tmp_path):
    make_dermnet(tmp_path)
    data = prepare_dataset(DatasetConfig(kind="dermnet", root=str(tmp_path), image_size=64))
    assert data.images.shape == (11, 3, 64, 64) and data.images.dtype == np.uint8
    assert data.classes == DERM
    # order: train (classes sorted, files sorted), then test; duplicates dropped
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    np.testing.assert_array_equal(data.is_test, [False] * 8 + [True] * 3)
    assert data.extra["duplicates_dropped"] == 2
    assert data.extra["duplicates_across_splits"] == 1
    assert data.extra["duplicate_label_conflicts"] == 0
    assert sorted(data.extra["duplicate_files"]) == [
        [f"test/{DERM[0]}/t0.jpg", f"train/{DERM[0]}/a1.jpg"],
        [f"train/{DERM[2]}/m3.jpg", f"train/{DERM[2]}/m1.jpg"]]
    assert "2 exact duplicate files dropped (1 across train/test)" in data.source
    # exact colours survive conversion and resizing: solid RGB, RGBA and grey images
    assert (data.images[1].reshape(3, -1).T == [200, 10, 30]).all()
    assert (data.images[4].reshape(3, -1).T == [10, 20, 30]).all()
    assert (data.images[5] == 128).all()
    # a grey JPEG becomes three equal channels
    assert (data.images[2, 0] == data.images[2, 1]).all()
    assert (data.images[2, 1] == data.images[2, 2]).all()
    again = prepare_dataset(DatasetConfig(kind="dermnet", root=str(tmp_path), image_size=64))
    assert again.checksum() == data.checksum()


def test_dermnet_matches_pil_reference(tmp_path):
    make_dermnet(tmp_path)
    data = prepare_dataset(DatasetConfig(kind="dermnet", root=str(tmp_path), image_size=64))
    with Image.open(tmp_path / "train" / DERM[2] / "m1.jpg") as img:
        ref = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.images[6], ref.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- Fashion-MNIST


def make_fashion(root: Path, gz: dict[str, bool]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y_tr = np.array([9, 0, 0, 3, 0, 2], dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    y_te = np.array([9, 2, 1, 1], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr, magic in [("train-images-idx3-ubyte", x_tr, 2051),
                             ("train-labels-idx1-ubyte", y_tr, 2049),
                             ("t10k-images-idx3-ubyte", x_te, 2051),
                             ("t10k-labels-idx1-ubyte", y_te, 2049)]:
        write_idx(root / (name + (".gz" if gz[name] else "")), arr, magic)
    return x_tr, y_tr, x_te, y_te


MIXED = {"train-images-idx3-ubyte": True, "train-labels-idx1-ubyte": False,
         "t10k-images-idx3-ubyte": False, "t10k-labels-idx1-ubyte": True}


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide a system-wide Fashion-MNIST so that tests see only their own files."""
    place = tmp_path / "system-fashion-mnist"
    monkeypatch.setattr(ds, "FASHION_MNIST_DIRS", (place,))
    return place


def test_fashion_mnist(tmp_path, no_system_fashion):
    x_tr, y_tr, x_te, y_te = make_fashion(tmp_path / "fm", MIXED)
    data = prepare_dataset(DatasetConfig(kind="fashion_mnist", root=str(tmp_path / "fm"),
                                         image_size=28))
    assert data.images.shape == (10, 3, 28, 28)
    for c in range(3):
        np.testing.assert_array_equal(data.images[:, c], np.concatenate([x_tr, x_te]))
    np.testing.assert_array_equal(data.labels, np.concatenate([y_tr, y_te]))
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.is_test, [False] * 6 + [True] * 4)
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert len(data.classes) == 10
    big = prepare_dataset(DatasetConfig(kind="fashion_mnist", root=str(tmp_path / "fm")))
    assert big.images.shape == (10, 3, 32, 32)


def test_fashion_mnist_system_place(tmp_path, no_system_fashion):
    make_fashion(no_system_fashion, dict.fromkeys(MIXED, True))  # as Debian ships them: .gz
    data = prepare_dataset(DatasetConfig.from_dict({"kind": "fashion_mnist"}))
    assert len(data.labels) == 10 and str(no_system_fashion) in data.source
    # a root without the files falls back to the system copy
    data = prepare_dataset(DatasetConfig(kind="fashion_mnist", root=str(tmp_path / "empty")))
    assert str(no_system_fashion) in data.source


SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (SYSTEM_FASHION / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_debian_copy():
    data = prepare_dataset(DatasetConfig(kind="fashion_mnist"))
    assert data.images.shape == (70000, 3, 32, 32)
    assert int(data.is_test.sum()) == 10000
    assert np.bincount(data.labels).tolist() == [7000] * 10
    assert data.labels[0] == 9  # the first training image is an ankle boot


# ----------------------------------------------------------------------------- imagefolder


def make_folder(root: Path) -> None:
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i, ext in enumerate([".png", ".JPG", ".bmp", ".gif", ".webp", ".jpeg"]):
            fmt = {".JPG": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext)
            save_image(root / name / f"{i:02d}{ext}", "RGB", (20 + i, 30), None,
                       fmt=fmt, seed=10 * c + i)
    save_image(root / "dog" / "sub" / "nested.png", "RGB", (16, 16), None, seed=99)
    (root / "dog" / "labels.csv").write_text("x")


def test_imagefolder_seeded_split(tmp_path):
    make_folder(tmp_path)
    cfg = DatasetConfig(kind="imagefolder", root=str(tmp_path), image_size=16,
                        test_fraction=0.5, split_seed=3)
    data = prepare_dataset(cfg)
    assert data.images.shape == (19, 3, 16, 16) and data.classes == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(data.labels, [0] * 6 + [1] * 7 + [2] * 6)
    np.testing.assert_array_equal(data.is_test, seeded_split(data.labels, 0.5, 3))
    assert data.extra["duplicates_dropped"] == 0
    assert "seeded split" in data.source


def test_imagefolder_train_test(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test")  # same seeds: every test file duplicates a train file
    save_image(tmp_path / "test" / "emu" / "new.png", "RGB", (16, 16), (1, 2, 3))
    data = prepare_dataset(DatasetConfig(kind="imagefolder", root=str(tmp_path), image_size=16))
    assert data.extra["duplicates_dropped"] == 19
    assert data.extra["duplicates_across_splits"] == 19
    assert len(data.labels) == 20 and data.is_test.tolist() == [False] * 19 + [True]
    assert data.labels[-1] == 2 and "train/test folders" in data.source


def test_pipeline_prepare_imagefolder(tmp_path):
    make_folder(tmp_path / "imgs")
    files = fio.prepared_paths(tmp_path / "out")
    pipeline.prepare({"kind": "imagefolder", "root": str(tmp_path / "imgs")}, files)
    meta = json.loads(Path(files["meta"]).read_text())
    assert meta["num_samples"] == 19 and meta["classes"] == ["cat", "dog", "emu"]
    assert np.load(files["images"]).shape == (19, 3, 32, 32)
