"""Dataset loaders: each turns a raw source into the canonical arrays of ``prepare``.

Canonical form (``PreparedData``): ``images`` uint8 N×C×H×W, ``labels`` int64 N,
``is_test`` bool N (the test split), plus class names and per-channel statistics
of the training split for normalisation. ``sample_id`` everywhere downstream is the
row index into these arrays.

Loaders (registered by name in :data:`DATASETS` with ``@DATASETS.register(name, ...)``,
whose facts say whether the loader reads files under ``root``, can download them, offers
the official split, and how many samples the source holds): ``digits`` (scikit-learn, no files),
``fashion_mnist`` (idx files, Debian's ``dataset-fashion-mnist`` or a folder),
``cifar100`` (the official python-pickle release, optionally downloaded),
``dermnet`` (the Kaggle ``train/``/``test/`` folder layout; its own split or the official
FedMIA code's) and ``imagefolder`` (any
folder-per-class tree). Raw-file problems raise ``FileNotFoundError`` or ``ValueError``
whose message names the file and the fix.

The workflow imports this module when it parses the Snakefile (to check each dataset's
config block against its kind), so it imports neither torch nor scikit-learn at import:
torch is :mod:`fedmia.core.lazy`'s, scikit-learn imported where it is used
(:func:`load_digits`).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from fedmia.core.config import ConfigError, DatasetConfig
from fedmia.core.lazy import F, torch
from fedmia.core.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """The canonical arrays of one dataset.

    Attributes:
        images: uint8 array, N×C×H×W.
        labels: int64 array, N, values in ``0 .. len(classes)-1``.
        is_test: bool array, N; True for the test split.
        classes: class names, index = label.
        source: human-readable provenance.
        extra: loader-specific facts worth keeping with the metadata (JSON-friendly), e.g.
            ``duplicates_dropped`` of the image-folder loaders.
    """

    images: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray
    classes: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 N×C×H×W, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (n,) or self.is_test.shape != (n,):
            raise ValueError("labels and is_test must have one entry per image")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError("labels must lie in 0 .. len(classes) - 1")

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std (in [0, 1] units) over the training split."""
        x = self.images[~self.is_test].astype(np.float64) / 255.0
        return x.mean(axis=(0, 2, 3)).tolist(), (x.std(axis=(0, 2, 3)) + 1e-8).tolist()

    def checksum(self) -> str:
        """SHA-256 over images, labels and split flags (detects any change of content)."""
        h = hashlib.sha256()
        for a in (self.images, self.labels, self.is_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


Loader = Callable[[DatasetConfig], PreparedData]


@dataclass(frozen=True)
class DatasetKind:
    """A registered dataset kind: its loader and what its config block may set.

    Attributes:
        load: the loader.
        root: ``required`` (it reads files under ``root``), ``optional`` (``root`` is
            searched first, then a system-wide copy) or ``none`` (it reads no files).
        download: whether ``download: true`` may fetch the files into ``root``.
        origin: where the data of a ``root: none`` kind comes from (for messages).
        official_split: whether ``split: official`` (the official FedMIA code's split,
            sized by ``pool_size`` and ``test_size``) is offered.
        samples: how many samples the source holds (both splits), for the cluster's
            resource estimates before ``prepare`` has run; ``None``: unknown.
    """

    load: Loader
    root: Literal["required", "optional", "none"] = "required"
    download: bool = False
    origin: str = ""
    official_split: bool = False
    samples: int | None = None

    def check(self, cfg: DatasetConfig, where: str = "dataset") -> None:
        """Raise a :class:`~fedmia.core.config.ConfigError` if ``cfg`` sets what it does not take.

        The message starts with ``where`` and the key (``datasets.digits.root: ...``).
        """
        if cfg.download and not self.download:
            able = (
                " or ".join(f"'{k}'" for k in DATASETS.registered() if DATASETS.get(k).download)
                or "no dataset"
            )
            raise ConfigError(
                f"{where}.download: only {able} can be downloaded; put the files "
                f"of '{cfg.kind}' under root by hand (see the loader's docstring) "
                "and drop download"
            )
        if self.root == "required" and cfg.root is None:
            raise ConfigError(
                f"{where}.root: '{cfg.kind}' reads its files from disk: set root "
                "to the folder that holds them"
            )
        if self.root == "none" and cfg.root is not None:
            origin = f"{self.origin} and " if self.origin else ""
            raise ConfigError(f"{where}.root: '{cfg.kind}' {origin}reads no files; drop root")
        if cfg.split == "official" and not self.official_split:
            able = (
                " or ".join(
                    f"'{k}'" for k in DATASETS.registered() if DATASETS.get(k).official_split
                )
                or "no dataset"
            )
            raise ConfigError(
                f"{where}.split: only {able} has the official code's split; "
                f"drop split to use the train/test split of '{cfg.kind}'"
            )


#: The dataset kinds (``datasets.<key>.kind``): ``@DATASETS.register(name, **facts)`` above
#: a loader makes a :class:`DatasetKind` of it and the facts.
DATASETS: Registry[DatasetKind] = Registry("dataset", build=DatasetKind)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize uint8 N×C×H×W images to N×C×size×size (uint8, rounded)."""
    if images.shape[-2:] == (size, size):
        return images
    x = torch.from_numpy(images).float()
    y = F.interpolate(
        x,
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=size < images.shape[-1],
    )
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded train/test split: returns the bool ``is_test`` mask."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(idx)))
        is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


@DATASETS.register("digits", root="none", origin="ships inside scikit-learn", samples=1_797)
def load_digits(cfg: DatasetConfig) -> PreparedData:
    """Scikit-learn's handwritten digits (1,797 real 8×8 images, 10 classes, no download).

    The 0..16 grey levels are scaled to 0..255, the images upscaled bilinearly to
    ``image_size`` and repeated to 3 channels so the CIFAR models take them unchanged;
    the test split is stratified and seeded by ``split_seed``.
    """
    # scikit-learn only here: importing it takes a second, and this module is imported
    # when the Snakefile is parsed
    from sklearn.datasets import load_digits as sk_digits  # noqa: PLC0415

    d = sk_digits()
    raw = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N×1×8×8
    images = np.repeat(resize_uint8(raw, cfg.image_size), 3, axis=1)
    labels = d.target.astype(np.int64)
    return PreparedData(
        images=np.ascontiguousarray(images),
        labels=labels,
        is_test=seeded_split(labels, cfg.test_fraction, cfg.split_seed),
        classes=[str(c) for c in range(10)],
        source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
    )


def _root(cfg: DatasetConfig) -> Path:
    """``cfg.root`` as an existing folder, or a ``FileNotFoundError`` that says what to set."""
    if cfg.root is None:
        raise FileNotFoundError(
            f"dataset '{cfg.kind}' reads its files from disk: set its root "
            "to the folder that holds them"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset '{cfg.kind}': root folder {root} does not exist; "
            "put the files there (see the loader's docstring) or fix root"
        )
    return root


# --------------------------------------------------------------------------- CIFAR-100

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_DIR = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")

# The globals a CIFAR pickle may name: numpy's array reconstruction and (for pickles written
# by Python 3 with protocol 2) ``_codecs.encode`` of bytes. Anything else is refused, so a
# tampered file cannot run code.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")
        return super().find_class(module, name)


def verify_md5(path: str | Path, expected: str) -> None:
    """Raise ``ValueError`` (naming the file, the expected and the actual MD5) on a mismatch."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    actual = h.hexdigest()
    if actual != expected.lower():
        raise ValueError(
            f"MD5 mismatch for {path}: expected {expected}, got {actual}; the file "
            "is corrupt or incomplete: delete it and download it again"
        )


def _unpickle(path: Path) -> dict[bytes, Any]:
    """Load one CIFAR pickle (a dict with bytes keys) without running foreign code."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        ImportError,
        UnicodeDecodeError,
        struct.error,
    ) as exc:
        raise ValueError(
            f"cannot read the CIFAR-100 pickle {path} ({type(exc).__name__}: "
            f"{exc}); the file is corrupt or truncated: delete the "
            f"{path.parent.name} folder and download {CIFAR100_URL} again"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not the dict of the CIFAR-100 "
            "python release; re-download it"
        )
    return obj


def _cifar_field(d: dict[bytes, Any], key: bytes, path: Path) -> Any:
    if key not in d:
        raise ValueError(
            f"{path} has no {key!r} entry (keys: {sorted(d)}); it is not a file of "
            f"the CIFAR-100 python release: re-download {CIFAR100_URL}"
        )
    return d[key]


def _cifar_split(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images N×3×32×32 and fine labels N of one CIFAR-100 pickle (``train`` or ``test``)."""
    d = _unpickle(path)
    data = np.asarray(_cifar_field(d, b"data", path))
    labels = np.asarray(_cifar_field(d, b"fine_labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 N×3072; "
            "re-download the CIFAR-100 python release"
        )
    if labels.shape != (len(data),):
        raise ValueError(
            f"{path}: {len(labels)} fine labels for {len(data)} images; "
            "re-download the CIFAR-100 python release"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: fine labels outside 0..{num_classes - 1}; re-download")
    # each row: 1024 red, 1024 green, 1024 blue values, each a row-major 32×32 plane
    return data.reshape(-1, 3, 32, 32), labels


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, refusing paths that leave ``dest``."""
    members = []
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"unsafe or unexpected archive member {m.name!r}")
        members.append(m)
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
        tar.extractall(dest, members=members, filter="data")
    else:  # pragma: no cover
        tar.extractall(dest, members=members)


def _extract_cifar100(archive: Path, folder: Path) -> None:
    """Extract ``archive`` so that ``folder`` appears complete or not at all."""
    log.info("extracting %s", archive)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            _safe_extract(tar, tmp)
        missing = [n for n in CIFAR100_FILES if not (tmp / CIFAR100_DIR / n).is_file()]
        if missing:
            raise ValueError(f"the archive lacks {CIFAR100_DIR}/{missing}")
        os.replace(tmp / CIFAR100_DIR, folder)
    except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
        raise ValueError(
            f"cannot extract {archive} ({exc}); delete it and download {CIFAR100_URL} again"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_cifar100(archive: Path) -> None:
    """Download the official archive to ``archive`` (verified; nothing is left on failure)."""
    part = archive.with_name(archive.name + ".part")
    log.info("downloading %s to %s", CIFAR100_URL, archive)
    try:
        with urllib.request.urlopen(CIFAR100_URL, timeout=60) as resp, open(part, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download CIFAR-100 from {CIFAR100_URL} ({exc}); download it by hand "
            f"(MD5 {CIFAR100_MD5}) and put {CIFAR100_ARCHIVE}, or the {CIFAR100_DIR}/ folder "
            f"extracted from it, into {archive.parent}"
        ) from exc
    try:
        verify_md5(part, CIFAR100_MD5)
    except ValueError as exc:
        part.unlink()
        raise ValueError(
            f"the download of {CIFAR100_URL} is damaged and was deleted: {exc}. "
            f"Try again, or download it by hand into {archive.parent}"
        ) from exc
    os.replace(part, archive)


def _cifar100_folder(root: Path, download: bool) -> Path:
    """``root/cifar-100-python`` with its three pickles, extracting/downloading if allowed."""
    folder = root / CIFAR100_DIR
    if folder.is_dir():
        missing = [n for n in CIFAR100_FILES if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {missing}; delete the folder and extract "
                f"{CIFAR100_ARCHIVE} ({CIFAR100_URL}) into {root} again"
            )
        return folder
    archive = root / CIFAR100_ARCHIVE
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-100 not found: expected {folder}/{{train,test,meta}}. Download "
                f"{CIFAR100_URL} (MD5 {CIFAR100_MD5}) into {root} (it is checked and extracted "
                "on the next run), extract it there yourself, or set download: true"
            )
        _download_cifar100(archive)  # verified before it is renamed to ``archive``
    else:
        verify_md5(archive, CIFAR100_MD5)
    _extract_cifar100(archive, folder)
    return folder


@DATASETS.register("cifar100", download=True, samples=60_000)
def load_cifar100(cfg: DatasetConfig) -> PreparedData:
    """CIFAR-100, the official python-pickle release: 50,000 train + 10,000 test, 32×32 RGB.

    Get it from https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-100-python.tar.gz``,
    MD5 ``eb9058c3a382ffc7106e4002c42a8d85``) and put it, or the ``cifar-100-python/``
    folder extracted from it, into ``root``. With ``download: true`` a missing archive is
    fetched there; an archive found in ``root`` is checked against the MD5 and extracted
    atomically (the folder appears complete or not at all). The pickles are read with an
    unpickler that accepts nothing but containers and numpy arrays. Labels are the 100
    fine labels, class names come from ``meta``, the official train/test split is kept,
    and images are resized only when ``image_size`` is not 32.
    """
    if cfg.download and cfg.root is not None:
        Path(cfg.root).expanduser().mkdir(parents=True, exist_ok=True)
    root = _root(cfg)
    folder = _cifar100_folder(root, cfg.download)
    meta_path = folder / "meta"
    names = _cifar_field(_unpickle(meta_path), b"fine_label_names", meta_path)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    x_train, y_train = _cifar_split(folder / "train", len(classes))
    x_test, y_test = _cifar_split(folder / "test", len(classes))
    images = resize_uint8(np.concatenate([x_train, x_test]), cfg.image_size)
    return PreparedData(
        images=np.ascontiguousarray(images),
        labels=np.concatenate([y_train, y_test]),
        is_test=np.repeat([False, True], [len(y_train), len(y_test)]),
        classes=classes,
        source=f"CIFAR-100 python release ({CIFAR100_URL}) at {folder}: {len(y_train)} train "
        f"+ {len(y_test)} test images, fine labels",
    )


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N)


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an idx file (plain or ``.gz``) of unsigned bytes: header checked, uint8 array out.

    The header is the big-endian magic number (``0x0000 08 ndim``) followed by ``ndim``
    big-endian uint32 sizes; the data must fill exactly the rest of the file.
    """
    path = Path(path)
    fix = "the file is corrupt or truncated: download it again"
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read {path} ({exc}); {fix}") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    got = int.from_bytes(buf[:4], "big") if len(buf) >= 4 else None
    if got is not None and got != magic:
        raise ValueError(
            f"{path}: idx magic number {got}, expected {magic}; not the right idx file ({fix})"
        )
    if len(buf) < header:
        raise ValueError(f"{path}: {len(buf)} bytes, shorter than its idx header; {fix}")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    size = header + math.prod(dims)
    if len(buf) != size:
        raise ValueError(f"{path}: {len(buf)} bytes, expected {size} for shape {dims}; {fix}")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_fashion_mnist(places: Iterable[Path]) -> tuple[Path, dict[str, Path]]:
    """The first folder holding all four idx files (each plain or ``.gz``) and their paths."""
    report = []
    for place in places:
        found = {}
        for key, name in FASHION_MNIST_FILES.items():
            for candidate in (place / name, place / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return place, found
        missing = [FASHION_MNIST_FILES[k] for k in FASHION_MNIST_FILES if k not in found]
        report.append(f"{place} (missing {missing})" if place.is_dir() else f"{place} (absent)")
    raise FileNotFoundError(
        "Fashion-MNIST idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz) not found in: "
        + "; ".join(report)
        + ". Install them with `apt-get install dataset-fashion-mnist` "
        "(Debian/Ubuntu) or download them from https://github.com/zalandoresearch/fashion-mnist "
        "and set root to their folder"
    )


@DATASETS.register("fashion_mnist", root="optional", samples=70_000)
def load_fashion_mnist(cfg: DatasetConfig) -> PreparedData:
    """Fashion-MNIST: 60,000 train + 10,000 test real 28×28 grey images of 10 clothing classes.

    The four idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are
    looked for in ``root`` (when set), then in ``/usr/share/datasets/fashion-mnist/`` where
    Debian's ``dataset-fashion-mnist`` package installs them gzipped; elsewhere download
    them from https://github.com/zalandoresearch/fashion-mnist. The official split is kept;
    images are resized bilinearly to ``image_size`` and repeated to 3 channels.
    """
    places = ([Path(cfg.root).expanduser()] if cfg.root is not None else []) + list(
        FASHION_MNIST_DIRS
    )
    place, files = _find_fashion_mnist(places)
    if cfg.root is not None and place != places[0]:
        log.warning("fashion_mnist: root %s lacks the idx files; using %s", cfg.root, place)
    parts = []
    for split in ("train", "test"):
        x = read_idx(files[f"{split}_images"], IDX_IMAGES_MAGIC)  # N×rows×cols
        y = read_idx(files[f"{split}_labels"], IDX_LABELS_MAGIC).astype(np.int64)  # N
        if len(x) != len(y):
            raise ValueError(
                f"{files[f'{split}_images']} holds {len(x)} images but "
                f"{files[f'{split}_labels']} {len(y)} labels; download them again"
            )
        if len(y) and y.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"{files[f'{split}_labels']}: label {y.max()} outside 0..9; download it again"
            )
        parts.append((x, y))
    (x_train, y_train), (x_test, y_test) = parts
    raw = np.concatenate([x_train, x_test])[:, None]  # N×1×28×28
    images = np.repeat(resize_uint8(raw, cfg.image_size), 3, axis=1)
    return PreparedData(
        images=np.ascontiguousarray(images),
        labels=np.concatenate([y_train, y_test]),
        is_test=np.repeat([False, True], [len(y_train), len(y_test)]),
        classes=list(FASHION_MNIST_CLASSES),
        source=f"Fashion-MNIST (Zalando Research) idx files at {place}: {len(y_train)} train "
        f"+ {len(y_test)} test images",
    )


# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


def _class_dirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (recursively, hidden ones skipped), sorted by path."""
    files = [
        p
        for p in class_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(s.startswith(".") for s in p.relative_to(class_dir).parts)
    ]
    if not files:
        raise ValueError(
            f"class folder {class_dir} holds no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it"
        )
    return sorted(files, key=lambda p: p.relative_to(class_dir).as_posix())


def _decode_image(path: Path, size: int) -> tuple[str, np.ndarray]:
    """SHA-256 of the file bytes and the image as uint8 size×size×3 RGB (PIL bilinear)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, not lazily later
            if img.mode == "P" and "transparency" in img.info:
                rgb = img.convert("RGBA").convert("RGB")
            else:
                rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)  # antialiased downscale
        return digest, np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"cannot decode image {path} ({exc}); the file is corrupt or "
            "truncated: download it again or delete it"
        ) from exc


def _same_classes(splits: list[tuple[Path, list[str]]]) -> list[str]:
    """The class names shared by every ``(folder, class names)`` of ``splits``.

    Raises:
        ValueError: a folder without class folders, or folders with different classes.
    """
    for folder, names in splits:
        if not names:
            raise ValueError(
                f"{folder} holds no class folders; the layout is {folder}/<class>/<image files>"
            )
    first_folder, first = splits[0]
    for folder, names in splits[1:]:
        if names != first:
            raise ValueError(
                f"class folders differ between {first_folder} and {folder}: only in "
                f"{first_folder.name}/: {sorted(set(first) - set(names))}, only in "
                f"{folder.name}/: {sorted(set(names) - set(first))}; make them hold the same "
                "classes (an empty class needs no folder in either)"
            )
    return first


def _decode_images(root: Path, files: list[Path], size: int) -> list[tuple[str, np.ndarray]]:
    """``(SHA-256 of the bytes, size×size×3 uint8 RGB)`` of each file, in order.

    Decoded on a few threads; the first file that cannot be decoded stops it
    (:func:`_decode_image`'s ``ValueError``).
    """
    log.info("decoding %d images under %s", len(files), root)
    workers = min(8, os.cpu_count() or 1)
    decoded: list[tuple[str, np.ndarray]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        try:
            for i, item in enumerate(pool.map(lambda p: _decode_image(p, size), files), 1):
                decoded.append(item)
                if i % 5000 == 0:
                    log.info("decoded %d / %d images", i, len(files))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # fail fast on the first bad file
            raise
    return decoded


def _duplicates(
    root: Path, files: list[Path], labels: list[int], flags: list[bool], digests: list[str]
) -> tuple[list[int], dict[str, Any]]:
    """Files with identical bytes: the first of each (in the given order) and a report.

    Returns:
        The indices of the first copies (every file without a copy included), ascending,
        and the report: ``duplicate_files`` (``[copy, first]`` paths relative to ``root``),
        their count, how many pairs lie across the split (``flags`` differ) and how many
        carry different labels.
    """
    seen: dict[str, int] = {}
    firsts: list[int] = []
    pairs: list[list[str]] = []
    across = conflicts = 0
    for i, digest in enumerate(digests):
        j = seen.setdefault(digest, i)
        if j == i:
            firsts.append(i)
            continue
        pairs.append([files[i].relative_to(root).as_posix(), files[j].relative_to(root).as_posix()])
        across += flags[i] != flags[j]
        conflicts += labels[i] != labels[j]
    return firsts, {
        "duplicates": len(pairs),
        "duplicates_across_splits": across,
        "duplicate_label_conflicts": conflicts,
        "duplicate_files": pairs,
    }


def _load_image_tree(
    root: Path, splits: list[tuple[Path, bool]], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """Decode folder-per-class trees and drop exact duplicate files.

    Args:
        root: the dataset root (paths in the duplicate report are relative to it).
        splits: ``(folder, is_test)`` in reading order; each folder holds one sub-folder
            per class, and all folders must hold the same classes.
        size: output side in pixels.

    Returns:
        images uint8 N×3×size×size, labels int64 N, is_test bool N, sorted class names and
        the duplicate report. Order: split by split, classes sorted, files sorted by path.
        Of files with identical bytes (SHA-256) only the first in this order is kept.
    """
    classes = _same_classes(
        [(folder, [d.name for d in _class_dirs(folder)]) for folder, _ in splits]
    )
    files: list[Path] = []
    labels: list[int] = []
    flags: list[bool] = []
    for folder, test in splits:
        for label, name in enumerate(classes):
            found = _image_files(folder / name)
            files += found
            labels += [label] * len(found)
            flags += [test] * len(found)

    decoded = _decode_images(root, files, size)
    keep, report = _duplicates(root, files, labels, flags, [d for d, _ in decoded])
    pairs = report["duplicate_files"]
    if pairs:
        log.warning(
            "dropped %d exact duplicate image files under %s (%d across train/test, "
            "%d with a different label); first: %s is %s",
            len(pairs),
            root,
            report["duplicates_across_splits"],
            report["duplicate_label_conflicts"],
            pairs[0][0],
            pairs[0][1],
        )
    extra = {"duplicates_dropped": report.pop("duplicates"), **report}
    images = np.stack([decoded[i][1] for i in keep]).transpose(0, 3, 1, 2)  # N×3×size×size
    return (
        np.ascontiguousarray(images),
        np.asarray(labels, dtype=np.int64)[keep],
        np.asarray(flags, dtype=bool)[keep],
        classes,
        extra,
    )


def _dup_note(extra: dict[str, Any]) -> str:
    return (
        f"{extra['duplicates_dropped']} exact duplicate files dropped "
        f"({extra['duplicates_across_splits']} across train/test)"
    )


# --------------------------------------------------------------------------- Dermnet

#: torchvision's ``IMG_EXTENSIONS`` (``torchvision.datasets.folder``), matched on the
#: lower-cased file name: the files ``ImageFolder`` lists.
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: The official code's Dermnet split (``utils/datasets.py`` of Liar-Mask/FedMIA):
#: ``setup_seed(42); torch.randperm(19559)``, ``[0:15000]`` the clients', ``[-4000:]`` the test set.
DERMNET_OFFICIAL_SEED = 42
DERMNET_OFFICIAL_POOL = 15_000
DERMNET_OFFICIAL_TEST = 4_000


def imagefolder_listing(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """The image files of ``folder`` as torchvision's ``ImageFolder`` lists them, in its order.

    torchvision's rule (``find_classes`` and ``make_dataset`` of
    ``torchvision.datasets.folder``): the classes are the names of the sub-folders
    (``os.scandir``, hidden ones included), sorted; per class, in that order, the folders
    of ``sorted(os.walk(class_folder, followlinks=True))`` (the class folder's own files
    before its sub-folders'), and in each folder the sorted file names whose lower-cased
    name ends with one of :data:`TORCHVISION_EXTENSIONS`. Names sort by code point
    (``"B.jpg" < "a.jpg"``, ``"img10.jpg" < "img2.jpg"``).

    Returns:
        The sorted class names, the files and their labels (index into the class names).

    Raises:
        ValueError: a class folder without such a file (torchvision raises too).
    """
    with os.scandir(folder) as entries:
        classes = sorted(e.name for e in entries if e.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = [
            Path(dirpath) / f
            for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True))
            for f in sorted(names)
            if f.lower().endswith(TORCHVISION_EXTENSIONS)
        ]
        if not found:
            raise ValueError(
                f"class folder {folder / name} holds no images "
                f"({', '.join(TORCHVISION_EXTENSIONS)}); add images or remove it"
            )
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def official_permutation(n: int, seed: int = DERMNET_OFFICIAL_SEED) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randperm(n)`` of the official code, int64 n.

    Drawn from a generator of its own, so torch's global one is left as it was. On the CPU,
    ``randperm`` is a Fisher–Yates shuffle over the 32-bit draws of the MT19937 seeded with
    ``seed`` (``tests/test_datasets.py`` checks it against a NumPy transcription).
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def _dermnet_official(root: Path, cfg: DatasetConfig) -> PreparedData:
    """The official code's Dermnet split (:func:`load_dermnet`, ``split: official``)."""
    pool = cfg.pool_size or DERMNET_OFFICIAL_POOL
    test = cfg.test_size or DERMNET_OFFICIAL_TEST
    listed = [imagefolder_listing(root / s) for s in ("train", "test")]
    classes = _same_classes(
        [(root / s, names) for s, (names, _, _) in zip(("train", "test"), listed, strict=True)]
    )
    files = listed[0][1] + listed[1][1]  # the official torch.cat([train, test])
    labels = listed[0][2] + listed[1][2]
    n = len(files)
    if pool + test > n:
        raise ValueError(
            f"the official split of Dermnet needs pool_size + test_size = {pool} + {test} = "
            f"{pool + test} images but {root}/train and {root}/test hold {n}; lower pool_size "
            "or test_size (the official 15,000 + 4,000 are for the full Kaggle release of "
            "19,559 images)"
        )
    perm = official_permutation(n)
    rows = np.concatenate([perm[:pool], perm[n - test :]])  # the official [0:pool], [-test:]
    unused = [files[i].relative_to(root).as_posix() for i in np.sort(perm[pool : n - test])]
    chosen = [files[i] for i in rows]
    chosen_labels = [labels[i] for i in rows]
    flags = [False] * pool + [True] * test
    decoded = _decode_images(root, chosen, cfg.image_size)
    _, report = _duplicates(root, chosen, chosen_labels, flags, [d for d, _ in decoded])
    if report["duplicates"]:
        log.warning(
            "the official split keeps %d exact duplicate image files, as the official "
            "code did (%d across pool/test, %d with a different label); first: %s is %s",
            report["duplicates"],
            report["duplicates_across_splits"],
            report["duplicate_label_conflicts"],
            *report["duplicate_files"][0],
        )
    extra = {
        "split": "official",
        "images_listed": n,
        "pool": pool,
        "test": test,
        "unused": len(unused),
        "unused_files": unused,
        "duplicates_kept": report.pop("duplicates"),
        **report,
    }
    images = np.stack([img for _, img in decoded]).transpose(0, 3, 1, 2)  # N×3×size×size
    return PreparedData(
        images=np.ascontiguousarray(images),
        labels=np.asarray(chosen_labels, dtype=np.int64),
        is_test=np.asarray(flags, dtype=bool),
        classes=classes,
        extra=extra,
        source=f"Dermnet (Kaggle release) at {root}, the official code's split: {n} images "
        f"(train/ then test/, in torchvision's ImageFolder order) permuted by "
        f"torch.randperm with seed {DERMNET_OFFICIAL_SEED}; the first {pool} the "
        f"clients' pool, the last {test} the test set, {len(unused)} unused (dropped); "
        f"{extra['duplicates_kept']} exact duplicate files kept "
        f"({extra['duplicates_across_splits']} across pool/test)",
    )


@DATASETS.register("dermnet", official_split=True, samples=19_559)
def load_dermnet(cfg: DatasetConfig) -> PreparedData:
    """Dermnet, the Kaggle release: skin-disease photos in 23 classes.

    Get it from https://www.kaggle.com/datasets/shubhamgoel27/dermnet and unzip it into
    ``root`` so that ``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg`` exist
    (train and test must hold the same class folders; classes are sorted by name). Images
    of any mode are converted to RGB and resized bilinearly to ``image_size``×``image_size``
    (the paper uses 64; the official code's ``gen_tensor_dataset.py`` applied
    ``Resize((64, 64))`` to the whole photo, no crop).

    ``split: null`` (default): the release's own ``train/`` and ``test/`` folders.
    Files with identical bytes are kept once (the first in the order train before test,
    sorted paths), because a picture on both sides of the split would make its membership
    meaningless; the count is logged and kept in ``extra``.

    ``split: official``: the split of the official code (Liar-Mask/FedMIA). Its
    ``gen_tensor_dataset.py`` (commit c2e651b of its 2024 history; not in ``main``) stacked
    ``ImageFolder(train)`` then ``ImageFolder(test)`` into ``dermnet_ts.pt``; its
    ``utils/datasets.py`` concatenates the two (19,559 images), calls ``setup_seed(42)``
    and ``torch.randperm(19559)``, gives the first 15,000 of the permuted images to the
    clients and the last 4,000 to the test set; the 559 between are unused. This loader
    lists the files exactly as torchvision's ``ImageFolder`` does
    (:func:`imagefolder_listing`: sorted class folders, sorted file names, torchvision's
    extensions; ``train/`` first, then ``test/``), draws the same permutation
    (:func:`official_permutation`) and keeps the first ``pool_size`` (default 15,000) as
    the training split and the last ``test_size`` (default 4,000) as the test split, in
    permuted order: row i < ``pool_size`` is index i of the official ``train_set``, row
    ``pool_size`` + j index j of its ``test_set``. The unused images are not in the arrays
    at all (nothing downstream can use them); ``extra`` lists their files. Byte-identical
    duplicates are kept, as the official code kept them, and reported in ``extra``
    (``duplicates_kept``, ``duplicate_files``). The clients' pool is the training split, so
    a partition with ``samples_per_client: null`` deals exactly it; fedmia's partitions do
    not redraw the official assignment of the pool to clients (docs/running.md, "Datasets").
    A smaller tree (tests, smoke runs) takes smaller ``pool_size``/``test_size``; a tree
    with fewer images than the two together is refused.
    """
    root = _root(cfg)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Dermnet root {root} has no {'/ or '.join(missing)}/ folder; "
            "unzip the Kaggle release there so that root/train/<class>/ and "
            "root/test/<class>/ exist"
        )
    if cfg.split == "official":
        return _dermnet_official(root, cfg)
    images, labels, is_test, classes, extra = _load_image_tree(
        root, [(root / "train", False), (root / "test", True)], cfg.image_size
    )
    return PreparedData(
        images=images,
        labels=labels,
        is_test=is_test,
        classes=classes,
        extra=extra,
        source=f"Dermnet (Kaggle release) at {root}: {int((~is_test).sum())} train + "
        f"{int(is_test.sum())} test images, {_dup_note(extra)}",
    )


@DATASETS.register("imagefolder")
def load_imagefolder(cfg: DatasetConfig) -> PreparedData:
    """Any folder-per-class image set: ``root/<class>/*`` or ``root/{train,test}/<class>/*``.

    Bring your own images (jpg, jpeg, png, bmp, gif, webp; any case, any mode, sub-folders
    of a class included) and set ``root``. With ``train/`` and ``test/`` folders that split
    is used; otherwise the test split is stratified and seeded (``test_fraction``,
    ``split_seed``). Classes are the sorted folder names; images are converted to RGB and
    resized bilinearly to ``image_size``; exact duplicate files are kept once, as in
    ``dermnet``.
    """
    root = _root(cfg)
    has = [(root / s).is_dir() for s in ("train", "test")]
    if any(has) and not all(has):
        present, absent = ("train", "test") if has[0] else ("test", "train")
        raise ValueError(
            f"{root} has a {present}/ folder but no {absent}/ folder; use "
            f"root/<class>/ (seeded split) or both root/train/<class>/ and "
            "root/test/<class>/"
        )
    if all(has):
        images, labels, is_test, classes, extra = _load_image_tree(
            root, [(root / "train", False), (root / "test", True)], cfg.image_size
        )
        split = "train/test folders"
    else:
        images, labels, _, classes, extra = _load_image_tree(root, [(root, False)], cfg.image_size)
        is_test = seeded_split(labels, cfg.test_fraction, cfg.split_seed)
        split = f"seeded split (test_fraction {cfg.test_fraction}, seed {cfg.split_seed})"
    return PreparedData(
        images=images,
        labels=labels,
        is_test=is_test,
        classes=classes,
        extra=extra,
        source=f"image folders at {root}, {split}: {len(labels)} images, {_dup_note(extra)}",
    )


def prepare_dataset(cfg: DatasetConfig) -> PreparedData:
    """Check ``cfg`` against its kind (:meth:`DatasetKind.check`) and run its loader.

    Raises:
        ValueError: an unknown kind (a :class:`~fedmia.core.config.ConfigError` for a setting
            the kind does not take); the loader's errors.
    """
    kind = DATASETS.get(cfg.kind)
    kind.check(cfg)
    data = kind.load(cfg)
    log.info(
        "prepared %s: %d images %s, %d classes, %d test",
        cfg.kind,
        len(data.images),
        data.images.shape[1:],
        len(data.classes),
        int(data.is_test.sum()),
    )
    return data
