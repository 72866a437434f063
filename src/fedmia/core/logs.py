"""Set-up for entry points (workflow scripts, benchmarks, CLI): logging, and job hygiene."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Seconds between two checks that the Snakemake process which started a job still lives.
WATCH_INTERVAL = 1.0

log = logging.getLogger(__name__)


def setup_logging(log_file: str | Path | None = None, *, level: int = logging.INFO) -> None:
    """Send log records to stderr (the terminal) and, if given, to ``log_file`` (truncated).

    Library modules only call ``logging.getLogger(__name__)``; this is called once
    by whatever runs them. It also ties a Snakemake job to the Snakemake that started
    it (:func:`die_with_snakemake`).
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
    die_with_snakemake()


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time)`` of a live process from /proc, or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])  # ppid, starttime (clock ticks since boot)


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def snakemake_ancestors(pid: int | None = None) -> list[tuple[int, int]]:
    """``(pid, start time)`` of the processes from our parent up to the top-most Snakemake.

    Empty when no ancestor is a Snakemake process (the stage was not started by
    Snakemake) or where /proc does not exist.
    """
    chain: list[tuple[int, int]] = []
    top = -1
    stat = _stat(os.getpid() if pid is None else pid)
    while stat is not None and stat[0] > 1:
        parent = stat[0]
        stat = _stat(parent)
        if stat is None:
            break
        chain.append((parent, stat[1]))
        if "snakemake" in _cmdline(parent):
            top = len(chain)
    return chain[:top] if top > 0 else []


def die_with_snakemake(interval: float = WATCH_INTERVAL) -> bool:
    """End this job if the Snakemake that started it dies (e.g. SIGKILLed).

    A job process outlives a killed Snakemake and would go on writing while a rerun
    starts the same job again. A daemon thread checks every ``interval`` seconds that
    every process between us and the top-most Snakemake ancestor is still the same
    process (pid and start time); when one is gone, it exits this process at once.
    Outputs are written to temporary names and renamed (:mod:`fedmia.stages.io`), so the
    exit leaves no partial output behind. Returns whether a watch was started.
    """
    ancestors = snakemake_ancestors()
    if not ancestors:
        return False

    def watch() -> None:
        while True:
            time.sleep(interval)
            for pid, start in ancestors:
                stat = _stat(pid)
                if stat is None or stat[1] != start:
                    log.error("Snakemake (pid %d) is gone: ending this job", pid)
                    logging.shutdown()
                    os._exit(1)

    threading.Thread(target=watch, name="die-with-snakemake", daemon=True).start()
    return True
