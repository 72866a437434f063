"""Dataset loaders on small files written in the exact official formats (no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmia import pipeline
from fedmia.core import contracts
from fedmia.core.config import DatasetConfig, PartitionConfig
from fedmia.federation import datasets as ds
from fedmia.federation.datasets import prepare_dataset, seeded_split, verify_md5
from fedmia.federation.partition import make_partition

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
    f"class_{i:02d}" for i in range(5, 100)
]


def make_cifar(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """A tiny CIFAR-100 python release under ``root/cifar-100-python``; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        py2_pickle(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
            folder / split,
        )
        out[split] = (data, fine)
    py2_pickle(
        {
            b"fine_label_names": [n.encode() for n in CIFAR_NAMES],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
        },
        folder / "meta",
    )
    return out


def cifar_tarball(tmp: Path) -> bytes:
    src = tmp / "src"
    make_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    return buf.getvalue()


def save_image(
    path: Path, mode: str, size: tuple[int, int], color, fmt: str | None = None, seed: int = 0
) -> None:
    """A solid image (``color``) or, with ``color=None``, random noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        arr = np.random.default_rng(seed).integers(
            0, 256, size=(size[1], size[0], 3), dtype=np.uint8
        )
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
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
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
        [f"train/{DERM[2]}/m3.jpg", f"train/{DERM[2]}/m1.jpg"],
    ]
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


# ------------------------------------------------------------------ Dermnet, official split

# Class folders and files that sort differently under other rules: upper before lower case,
# "a10" before "a2", an upper-case extension, a sub-folder after its class folder's own
# files (torchvision walks it after them), and files torchvision does not list (.gif, .txt)
# or does (.tif). Classes sorted by code point: "Acne ...", "Eczema Photos", "acne (lower)".
OFFICIAL_TREE = {
    "train": {
        "Eczema Photos": ["e1.jpg", "e10.jpg", "e2.jpg", "E3.jpg", "e4.jpeg"],
        "Acne and Rosacea Photos": [
            "a2.jpg",
            "a10.jpg",
            "B.jpg",
            "a1.JPG",
            "z.jpg",
            "sub/c.jpg",
            "sub/b.jpg",
            "scan.tif",
            "anim.gif",
            "notes.txt",
        ],
        "acne (lower)": ["l1.jpg", "l2.jpg", "l3.jpg", "l4.jpg", "l5.jpg", "l6.jpg"],
    },
    "test": {
        "Eczema Photos": ["t1.jpg", "t2.jpg", "t3.jpg"],
        "Acne and Rosacea Photos": ["u2.jpg", "u1.jpg", "U3.jpg", "u4.jpg"],
        "acne (lower)": ["v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg", "v5.jpg"],
    },
}
# torchvision's order of the first class of train/, by hand
ACNE_ORDER = ["B.jpg", "a1.JPG", "a10.jpg", "a2.jpg", "scan.tif", "z.jpg", "sub/b.jpg", "sub/c.jpg"]


def make_dermnet_official(root: Path) -> None:
    """64×64 noise images (each file its own), JPEG but for the .tif and the .gif."""
    for i, (split, classes) in enumerate(
        (s, c) for s, cs in OFFICIAL_TREE.items() for c in cs.items()
    ):
        for j, name in enumerate(classes[1]):
            path = root / split / classes[0] / name
            if name.endswith(".txt"):
                path.write_text("not an image")
                continue
            fmt = {".gif": "GIF", ".tif": "TIFF"}.get(path.suffix.lower(), "JPEG")
            save_image(path, "RGB", (64, 64), None, fmt, seed=100 * i + j)


def official_recipe(root: Path, pool: int, test: int) -> tuple[list[str], list[str], list[str]]:
    """The official split transcribed from its source, by file name (relative to root).

    Returns the files listed (train/ then test/), the clients' pool and the test set.

    ``gen_tensor_dataset.py``: ``ImageFolder(train)``, ``ImageFolder(test)``, whose files
    are torchvision's ``make_dataset`` listing; ``utils/datasets.py``:
    ``torch.cat([train, test])``, ``setup_seed(42)``, ``torch.randperm(n)``, the first
    ``pool`` to the clients, the last ``test`` the test set.
    """
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def image_folder(folder: Path) -> list[str]:
        out = []
        for target in sorted(d for d in os.listdir(folder) if (folder / d).is_dir()):
            for dirpath, _, fnames in sorted(os.walk(folder / target, followlinks=True)):
                out += [
                    os.path.relpath(os.path.join(dirpath, f), root)
                    for f in sorted(fnames)
                    if f.lower().endswith(extensions)
                ]
        return out

    files = image_folder(root / "train") + image_folder(root / "test")
    with torch.random.fork_rng():
        torch.manual_seed(42)
        perm = torch.randperm(len(files)).tolist()
    return files, [files[i] for i in perm[:pool]], [files[i] for i in perm[-test:]]


def official_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig.from_dict(
        {"kind": "dermnet", "root": str(root), "image_size": 64, "split": "official", **kw}
    )


def decoded_names(root: Path, images: np.ndarray) -> list[str]:
    """Which file of ``root`` each image is, by its pixels (every file is its own noise)."""
    by_pixels = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in {".jpg", ".jpeg", ".tif"}:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
            by_pixels[arr.tobytes()] = path.relative_to(root).as_posix()
    return [by_pixels[img.tobytes()] for img in images]


def test_dermnet_official_listing_is_torchvisions(tmp_path):
    make_dermnet_official(tmp_path)
    classes, files, labels = ds.imagefolder_listing(tmp_path / "train")
    assert classes == ["Acne and Rosacea Photos", "Eczema Photos", "acne (lower)"]
    first = [
        f.relative_to(tmp_path / "train" / classes[0]).as_posix()
        for f, label in zip(files, labels, strict=True)
        if label == 0
    ]
    assert first == ACNE_ORDER
    assert [f.name for f, label in zip(files, labels, strict=True) if label == 1] == [
        "E3.jpg",
        "e1.jpg",
        "e10.jpg",
        "e2.jpg",
        "e4.jpeg",
    ]


def test_dermnet_official_split_is_the_official_recipe(tmp_path):
    make_dermnet_official(tmp_path)
    data = prepare_dataset(official_cfg(tmp_path, pool_size=18, test_size=8))
    listed, pool, test = official_recipe(tmp_path, 18, 8)
    assert len(listed) == 19 + 12  # torchvision lists 8 + 5 + 6 in train/, 3 + 4 + 5 in test/
    assert data.images.shape == (26, 3, 64, 64)
    np.testing.assert_array_equal(data.is_test, [False] * 18 + [True] * 8)
    # the same files, in the official order: row i is the official train_set[i], row
    # 18 + j its test_set[j]
    assert decoded_names(tmp_path, data.images) == pool + test
    classes = ["Acne and Rosacea Photos", "Eczema Photos", "acne (lower)"]
    assert data.classes == classes
    assert [classes[y] for y in data.labels] == [f.split("/")[1] for f in pool + test]
    assert data.extra["images_listed"] == 31
    assert data.extra["unused"] == 5
    assert data.extra["unused_files"] == [f for f in listed if f not in pool + test]
    assert data.extra["duplicates_kept"] == 0
    assert "the first 18 the clients' pool, the last 8 the test set, 5 unused" in data.source
    again = prepare_dataset(official_cfg(tmp_path, pool_size=18, test_size=8))
    assert again.checksum() == data.checksum()
    # the release's split of the same tree: every image fedmia reads (.gif yes, .tif no)
    own = prepare_dataset(DatasetConfig(kind="dermnet", root=str(tmp_path), image_size=64))
    assert int((~own.is_test).sum()) == 19 and int(own.is_test.sum()) == 12


def test_dermnet_official_split_keeps_duplicates(tmp_path):
    """As the official code: a byte-identical copy stays (reported), so the sizes hold."""
    make_dermnet_official(tmp_path)
    test_dir = tmp_path / "test" / "Eczema Photos"
    (test_dir / "t4.jpg").write_bytes(
        (tmp_path / "train" / "Eczema Photos" / "e1.jpg").read_bytes()
    )
    data = prepare_dataset(official_cfg(tmp_path, pool_size=24, test_size=8))  # all 32 used
    _, pool, test = official_recipe(tmp_path, 24, 8)
    assert data.images.shape[0] == 32
    assert data.extra["duplicates_kept"] == 1
    first, copy = sorted(
        ["train/Eczema Photos/e1.jpg", "test/Eczema Photos/t4.jpg"], key=(pool + test).index
    )
    assert data.extra["duplicate_files"] == [[copy, first]]
    rows = [(pool + test).index(f) for f in (first, copy)]
    np.testing.assert_array_equal(data.images[rows[0]], data.images[rows[1]])
    assert data.extra["duplicates_across_splits"] == int(data.is_test[rows].sum() == 1)


def test_dermnet_official_pool_is_what_partitions_deal(tmp_path):
    make_dermnet_official(tmp_path)
    data = prepare_dataset(official_cfg(tmp_path, pool_size=20, test_size=8))
    part = make_partition(
        data.labels,
        data.is_test,
        PartitionConfig(kind="iid", num_clients=4, eval_members_per_client=5, eval_nonmembers=8),
        seed=0,
    )
    assert (part.client_id[:20] >= 0).all() and (part.client_id[20:] == -1).all()
    assert np.bincount(part.client_id[:20]).tolist() == [5, 5, 5, 5]


def test_official_permutation_is_the_mt19937_fisher_yates_of_torch_1x():
    """``torch.randperm`` on the CPU as the official code's torch had it
    (``aten/src/ATen/native/TensorFactories.cpp``, ``randperm_cpu``): r = 0..n-1, then for
    i < n - 1 swap r[i] with r[i + z], z = (next 32-bit MT19937 draw) % (n - i), the
    MT19937 seeded as ``std::mt19937(42)`` (the legacy seeding NumPy's RandomState uses)."""
    for n in (1, 2, 37, 19_559):
        _, key, pos, *_ = np.random.RandomState(ds.DERMNET_OFFICIAL_SEED).get_state()
        bits = np.random.MT19937()
        bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        draws = bits.random_raw(max(n - 1, 0))
        r = list(range(n))
        for i in range(n - 1):
            z = int(draws[i]) % (n - i)
            r[i], r[i + z] = r[i + z], r[i]
        np.testing.assert_array_equal(ds.official_permutation(n), r)
    # the full release: the official first and last indices (19,559 images)
    perm = ds.official_permutation(19_559)
    assert perm[:4].tolist() == [7587, 1592, 405, 13401] and perm[-2:].tolist() == [6602, 3664]


def test_official_permutation_leaves_torchs_generator_alone():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        ds.official_permutation(100)
        np.testing.assert_array_equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- Fashion-MNIST


def make_fashion(root: Path, gz: dict[str, bool]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    y_tr = np.array([9, 0, 0, 3, 0, 2], dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    y_te = np.array([9, 2, 1, 1], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr, magic in [
        ("train-images-idx3-ubyte", x_tr, 2051),
        ("train-labels-idx1-ubyte", y_tr, 2049),
        ("t10k-images-idx3-ubyte", x_te, 2051),
        ("t10k-labels-idx1-ubyte", y_te, 2049),
    ]:
        write_idx(root / (name + (".gz" if gz[name] else "")), arr, magic)
    return x_tr, y_tr, x_te, y_te


MIXED = {
    "train-images-idx3-ubyte": True,
    "train-labels-idx1-ubyte": False,
    "t10k-images-idx3-ubyte": False,
    "t10k-labels-idx1-ubyte": True,
}


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide a system-wide Fashion-MNIST so that tests see only their own files."""
    place = tmp_path / "system-fashion-mnist"
    monkeypatch.setattr(ds, "FASHION_MNIST_DIRS", (place,))
    return place


def test_fashion_mnist(tmp_path, no_system_fashion):
    x_tr, y_tr, x_te, y_te = make_fashion(tmp_path / "fm", MIXED)
    data = prepare_dataset(
        DatasetConfig(kind="fashion_mnist", root=str(tmp_path / "fm"), image_size=28)
    )
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


@pytest.mark.skipif(
    not (SYSTEM_FASHION / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
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
            save_image(
                root / name / f"{i:02d}{ext}", "RGB", (20 + i, 30), None, fmt=fmt, seed=10 * c + i
            )
    save_image(root / "dog" / "sub" / "nested.png", "RGB", (16, 16), None, seed=99)
    (root / "dog" / "labels.csv").write_text("x")


def test_imagefolder_seeded_split(tmp_path):
    make_folder(tmp_path)
    cfg = DatasetConfig(
        kind="imagefolder", root=str(tmp_path), image_size=16, test_fraction=0.5, split_seed=3
    )
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
    files = contracts.prepared_paths(tmp_path / "out")
    pipeline.prepare({"kind": "imagefolder", "root": str(tmp_path / "imgs")}, files)
    meta = json.loads(Path(files["meta"]).read_text())
    assert meta["num_samples"] == 19 and meta["classes"] == ["cat", "dog", "emu"]
    assert np.load(files["images"]).shape == (19, 3, 32, 32)
