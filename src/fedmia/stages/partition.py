"""Stage 2, ``partition``: clients' shards and the evaluation set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmia.core.config import PartitionConfig
from fedmia.core.registry import import_plugins
from fedmia.federation.partition import make_partition
from fedmia.stages import io


def partition(
    data: Mapping[str, str | Path],
    partition_cfg: Mapping[str, Any],
    seed: int,
    output: str | Path,
    *,
    plugins: Sequence[str] = (),
) -> None:
    """Stage 2: deal the training split to clients and draw the evaluation set.

    Args:
        data: files of the prepared dataset (``labels`` and ``is_test`` are read).
        partition_cfg: the partition's config block.
        seed: the cell's seed.
        output: the partition Parquet.
        plugins: the config's ``plugins``, imported first (they register kinds).
    """
    import_plugins(plugins)
    cfg = PartitionConfig.from_dict(partition_cfg)
    labels, is_test = np.load(data["labels"]), np.load(data["is_test"])
    df = make_partition(labels, is_test, cfg, seed)
    io.write_parquet(df, output, "partition")
