"""Stage 2, ``partition``: clients' shards and the evaluation set."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmia import io
from fedmia.config import PartitionConfig
from fedmia.partition import make_partition


def partition(
    data: Mapping[str, str | Path], partition_cfg: Mapping[str, Any], seed: int, output: str | Path
) -> None:
    """Stage 2: deal the training split to clients and draw the evaluation set."""
    cfg = PartitionConfig.from_dict(partition_cfg)
    labels, is_test = np.load(data["labels"]), np.load(data["is_test"])
    df = make_partition(labels, is_test, cfg, seed)
    io.write_parquet(df, output, "partition")
