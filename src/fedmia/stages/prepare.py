"""Stage 1, ``prepare``: the canonical arrays of a dataset."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import fedmia
from fedmia.core.config import DatasetConfig
from fedmia.core.registry import import_plugins
from fedmia.federation.datasets import load_digits, prepare_dataset
from fedmia.stages import io


def prepare(
    dataset: Mapping[str, Any], outputs: Mapping[str, str | Path], *, plugins: Sequence[str] = ()
) -> None:
    """Stage 1: build a dataset's canonical arrays and metadata.

    Args:
        dataset: the dataset's config block (``DatasetConfig`` fields).
        outputs: files for ``images``, ``labels``, ``is_test`` and ``meta``
            (:data:`fedmia.core.contracts.PREPARED_FILES`).
        plugins: the config's ``plugins``, imported first (they register kinds).
    """
    import_plugins(plugins)
    cfg = DatasetConfig.from_dict(dataset)
    data = prepare_dataset(cfg)
    mean, std = data.channel_stats()
    n, c, h, w = data.images.shape
    meta = {
        "kind": cfg.kind,
        "config": dict(dataset),
        "source": data.source,
        "classes": data.classes,
        "num_classes": len(data.classes),
        "shape": [c, h, w],
        "num_samples": n,
        "num_test": int(data.is_test.sum()),
        "mean": mean,
        "std": std,
        "sha256": data.checksum(),
        "fedmia_version": fedmia.__version__,
        "extra": data.extra,
    }
    io.save_prepared(data, outputs, meta)


def write_standin(*, standin: Mapping[str, Any], output: str | Path) -> None:
    """A small image tree in the Kaggle Dermnet layout, written from scikit-learn's digits.

    For smoke runs of loaders whose real data cannot be downloaded on the machine (the
    ``standins:`` config section; ``config/paper_smoke.yaml``): real images, the official
    folder layout — ``output/train/digit_<c>/<i>.jpg`` and ``output/test/digit_<c>/<i>.jpg``
    for the 10 digit classes — so the loader and its official split run on files as they
    would on the release. Per class, the first ``train_per_class`` digits (in
    scikit-learn's order) go to ``train/`` and the next ``test_per_class`` to ``test/``,
    upscaled to ``image_size`` and saved as RGB JPEG (quality 95; the same bytes on every
    run with the same Pillow). The folder appears whole or not at all (written under a
    temporary name, then renamed).

    Args:
        standin: ``train_per_class``, ``test_per_class`` and ``image_size`` (pixels).
        output: the tree's root folder.
    """
    train, test = int(standin["train_per_class"]), int(standin["test_per_class"])
    size = int(standin.get("image_size", 64))
    digits = load_digits(DatasetConfig(kind="digits", image_size=size))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        for c in range(10):
            ids = np.flatnonzero(digits.labels == c)
            if len(ids) < train + test:
                raise ValueError(
                    f"standin: digit {c} has {len(ids)} images, fewer than "
                    f"train_per_class + test_per_class = {train + test}; lower them"
                )
            for split, chosen in (("train", ids[:train]), ("test", ids[train : train + test])):
                folder = tmp / split / f"digit_{c}"
                folder.mkdir(parents=True)
                for i in chosen:
                    Image.fromarray(digits.images[i].transpose(1, 2, 0)).save(
                        folder / f"{int(i):04d}.jpg", quality=95
                    )
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
