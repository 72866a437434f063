"""Dataset loaders: each turns a raw source into the canonical arrays of ``prepare``.

Canonical form (``PreparedData``): ``images`` uint8 N×C×H×W, ``labels`` int64 N,
``is_test`` bool N (the test split), plus class names and per-channel statistics
of the training split for normalisation. ``sample_id`` everywhere downstream is the
row index into these arrays.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedmia.config import DatasetConfig
from fedmia.registry import Registry

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
    """

    images: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} "
                             f"{self.images.shape}")
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
DATASETS: Registry[Loader] = Registry("dataset")


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize uint8 N×C×H×W images to N×C×size×size (uint8, rounded)."""
    if images.shape[-2:] == (size, size):
        return images
    x = torch.from_numpy(images).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < images.shape[-1])
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


@DATASETS.register("digits")
def load_digits(cfg: DatasetConfig) -> PreparedData:
    """Scikit-learn's handwritten digits (1,797 real 8×8 images, 10 classes, no download).

    The 0..16 grey levels are scaled to 0..255, the images upscaled bilinearly to
    ``image_size`` and repeated to 3 channels so the CIFAR models take them unchanged;
    the test split is stratified and seeded by ``split_seed``.
    """
    from sklearn.datasets import load_digits as sk_digits

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


def prepare_dataset(cfg: DatasetConfig) -> PreparedData:
    """Run the registered loader of ``cfg.kind``."""
    data = DATASETS.get(cfg.kind)(cfg)
    log.info("prepared %s: %d images %s, %d classes, %d test", cfg.kind, len(data.images),
             data.images.shape[1:], len(data.classes), int(data.is_test.sum()))
    return data
