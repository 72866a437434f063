"""The workflow's stages as plain functions, for use from Python and tests.

Each rule runs one entry module of :mod:`fedmia.stages` (its code fingerprint is a
param of the rule); this module gathers their functions in one place.
"""

from fedmia.core.contracts import HISTORY_COLUMNS
from fedmia.stages.attack import attack
from fedmia.stages.compute import device_name, resolve_device, setup_compute
from fedmia.stages.io import available_rounds, cells_frame, read_manifest
from fedmia.stages.measure import measure
from fedmia.stages.partition import partition
from fedmia.stages.prepare import prepare
from fedmia.stages.recording import import_recording
from fedmia.stages.report import (
    report_cell_figures,
    report_hypervolume,
    report_privacy_utility,
    report_table_figure,
    report_tables,
)
from fedmia.stages.train import train

__all__ = [
    "HISTORY_COLUMNS",
    "attack",
    "available_rounds",
    "cells_frame",
    "device_name",
    "import_recording",
    "measure",
    "partition",
    "prepare",
    "read_manifest",
    "report_cell_figures",
    "report_hypervolume",
    "report_privacy_utility",
    "report_table_figure",
    "report_tables",
    "resolve_device",
    "setup_compute",
    "train",
]
