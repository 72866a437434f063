"""The locked environments shipped with the repository, and which one is running.

``requirements/*.txt`` (written by ``scripts/lock.sh``) pin every distribution of an
environment ``==`` with hashes: ``py311-linux-x86_64-cpu.txt`` (CPU-only torch, what
CI and the README install) and ``py311-linux-x86_64-cuda.txt``. :func:`lock_sha256`
names the lock the running interpreter was installed from, so that a result can
record the exact stack that produced it (the train stage's manifest, ``lock_sha256``).

Standard library only: importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Where the lock files lie in a source checkout (editable installs, CI); absent from
#: an installed wheel.
LOCK_DIR = Path(__file__).resolve().parents[3] / "requirements"

#: A pin, ``name==version`` or ``name[extra,...]==version`` (extras kept: scripts/lock.sh).
_PIN = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9._, -]*\])?"
    r"==([^\s;\\]+)\s*(?:\\)?$"
)


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form (``PyYAML`` and ``pyyaml`` are one name)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_files(lock_dir: Path = LOCK_DIR) -> list[Path]:
    """The lock files shipped in ``lock_dir``, sorted; ``[]`` outside a source checkout."""
    if not (lock_dir.parent / "pyproject.toml").is_file():
        return []
    return sorted(lock_dir.glob("*.txt"))


def read_pins(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of a lock file's ``name==version`` lines (extras dropped).

    Comments, pip options (``--find-links``) and the indented ``--hash`` lines under a
    pin are skipped. Any other line is an error naming the file and line: a lock pins
    every distribution exactly.
    """
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "-")) or raw[:1].isspace():
            continue
        found = _PIN.match(line)
        if found is None:
            raise ValueError(
                f"{path}:{lineno}: {line!r} is not an exact pin (name==version); "
                "regenerate the lock with scripts/lock.sh"
            )
        pins[normalise(found.group(1))] = found.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution the running interpreter sees."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(normalise(name), dist.version)
    return out


def mismatches(pins: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """One line per pinned distribution whose installed version differs (or is absent)."""
    return [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in sorted(pins.items())
        if installed.get(name) != version
    ]


def lock_sha256(
    files: Iterable[Path] | None = None, installed: Mapping[str, str] | None = None
) -> str | None:
    """The sha256 of the shipped lock file the running environment was installed from.

    That is the first of ``files`` (default: :func:`lock_files`) whose every pin is
    installed at exactly its version (``installed``, default: :func:`installed_versions`).
    ``None`` when no lock is shipped (an install from a wheel) or none matches (an
    unlocked ``pip install -e .``, or packages upgraded since): the stack is then not
    one the repository names.
    """
    files = lock_files() if files is None else list(files)
    if not files:
        return None
    installed = installed_versions() if installed is None else installed
    for path in files:
        if not mismatches(read_pins(path), installed):
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return None
