"""Logging set-up for entry points (workflow scripts, benchmarks, CLI)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, *, level: int = logging.INFO) -> None:
    """Send log records to stderr (the terminal) and, if given, to ``log_file`` (truncated).

    Library modules only call ``logging.getLogger(__name__)``; this is called once
    by whatever runs them.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)

    def excepthook(exc_type, exc, tb):  # noqa: ANN001
        # An uncaught error also lands in the rule's log, not only on the terminal.
        logging.getLogger("fedmia").critical("failed: %s", exc, exc_info=(exc_type, exc, tb))

    sys.excepthook = excepthook
