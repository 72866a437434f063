"""Stage 1, ``prepare``: the canonical arrays of a dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fedmia
from fedmia import io
from fedmia.config import DatasetConfig
from fedmia.datasets import prepare_dataset
from fedmia.registry import import_plugins


def prepare(dataset: Mapping[str, Any], outputs: Mapping[str, str | Path], *,
            plugins: Sequence[str] = ()) -> None:
    """Stage 1: build a dataset's canonical arrays and metadata.

    Args:
        dataset: the dataset's config block (``DatasetConfig`` fields).
        outputs: files for ``images``, ``labels``, ``is_test`` and ``meta``
            (:data:`fedmia.io.PREPARED_FILES`).
        plugins: the config's ``plugins``, imported first (they register kinds).
    """
    import_plugins(plugins)
    cfg = DatasetConfig.from_dict(dataset)
    data = prepare_dataset(cfg)
    mean, std = data.channel_stats()
    n, c, h, w = data.images.shape
    meta = {
        "kind": cfg.kind, "config": dict(dataset), "source": data.source,
        "classes": data.classes, "num_classes": len(data.classes),
        "shape": [c, h, w], "num_samples": n, "num_test": int(data.is_test.sum()),
        "mean": mean, "std": std, "sha256": data.checksum(), "fedmia_version": fedmia.__version__,
        "extra": data.extra,
    }
    io.save_prepared(data, outputs, meta)
