#!/usr/bin/env bash
# Drift check: does fedmia still work with the newest versions of its dependencies?
#
#   scripts/drift.sh [pytest options]
#
# Installs fedmia unlocked, `pip install --upgrade -e '.[test]'` (the newest versions
# that pyproject.toml allows; torch's CPU build from the page the CPU lock names), into
# a throwaway venv under /tmp, prints every package whose version differs from the CPU
# lock, and runs the fast tests: `pytest -m "not workflow and not slurm"` (minus the
# test that the environment is the lock's, which drift fails by definition). A failure
# is what users of an unlocked install will meet: fix it, or bound the version in
# pyproject.toml (with a comment), then regenerate the locks with scripts/lock.sh.
# Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/py311-linux-x86_64-cpu.txt

venv=$(mktemp -d /tmp/fedmia-drift.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"

# The lock's own source of the CPU torch. Where its host does not resolve, pip takes the
# wheel from a local find-links folder; one retry instead of five per package (see .ci/run).
read -r -a torch_page < <(grep -m1 '^--find-links ' "$lock")
timeout 10 getent hosts download.pytorch.org >/dev/null || export PIP_RETRIES=1

start=$(date +%s)
if ! "$venv/bin/pip" install --upgrade "${torch_page[@]}" -e '.[test]' >"$venv/pip.log" 2>&1; then
  tail -n 40 "$venv/pip.log"
  echo "== pip could not install the newest versions (above)" >&2
  exit 1
fi
echo "== installed the newest versions in $(( $(date +%s) - start ))s"

"$venv/bin/python" - "$lock" <<'PY'
import sys
from pathlib import Path

from fedmia.core.lockfile import installed_versions, mismatches, read_pins

pins, installed = read_pins(Path(sys.argv[1])), installed_versions()
drift = mismatches(pins, installed)
new = sorted(set(installed) - set(pins) - {"fedmia", "pip"})
print(f"== drift from {sys.argv[1]}: {len(drift)} of {len(pins)} pinned packages differ")
for line in drift:
    print("  ", line)
if new:
    print("== installed but not in the lock:", ", ".join(f"{n} {installed[n]}" for n in new))
PY

t=$(date +%s)
rc=0
"$venv/bin/python" -m pytest -m "not workflow and not slurm" -q -p no:cacheprovider \
  --deselect tests/test_lockfile.py::test_the_running_environment_is_installed_from_a_shipped_lock \
  "$@" || rc=$?
echo "== fast tests on the newest versions: exit code $rc in $(( $(date +%s) - t ))s" \
  "($(( $(date +%s) - start ))s with the install)"
exit "$rc"
