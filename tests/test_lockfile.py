"""The locked environments (requirements/*.txt, scripts/lock.sh) and fedmia.core.lockfile."""

from __future__ import annotations

import hashlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement

from fedmia.core.lockfile import (
    LOCK_DIR,
    installed_versions,
    lock_files,
    lock_sha256,
    mismatches,
    normalise,
    read_pins,
)

CPU = LOCK_DIR / "py311-linux-x86_64-cpu.txt"
CUDA = LOCK_DIR / "py311-linux-x86_64-cuda.txt"
REGENERATE = "change pyproject.toml, then regenerate the locks with scripts/lock.sh"
GPU_ONLY = re.compile(r"nvidia-.*|cuda-.*|triton")


def declared(repo) -> list[Requirement]:
    """[project.dependencies] and every extra of pyproject.toml (the locks hold them all)."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def test_the_shipped_locks_are_the_cpu_and_the_cuda_variant():
    assert lock_files() == [CPU, CUDA]


@pytest.mark.parametrize("lock", [CPU, CUDA], ids=["cpu", "cuda"])
def test_every_declared_dependency_is_pinned_within_its_bounds(repo, lock):
    pins = read_pins(lock)
    problems = []
    for req in declared(repo):
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins.get(normalise(req.name))
        if version is None:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} is outside {req}")
    assert not problems, f"{lock.name}: {problems}; {REGENERATE}"


@pytest.mark.parametrize("lock", [CPU, CUDA], ids=["cpu", "cuda"])
def test_every_pin_carries_a_hash(lock):
    # pip's hash-checking mode, on once any line has a hash, refuses a pin without one
    text = lock.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    pinned = [b for b in blocks if re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?==", b)]
    # a package asked for with an extra is pinned twice, with it and without (scripts/lock.sh)
    names = {normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", b).group()) for b in pinned}
    assert len(names) == len(read_pins(lock))
    unhashed = [b.split()[0] for b in pinned if not re.search(r"--hash=sha256:[0-9a-f]{64}", b)]
    assert not unhashed, f"{lock.name}: no hash for {unhashed}; {REGENERATE}"


def test_the_cpu_lock_takes_torch_from_pytorch_cpu_page_and_no_gpu_package():
    pins = read_pins(CPU)
    assert pins["torch"].endswith("+cpu")
    assert not [name for name in pins if GPU_ONLY.fullmatch(name)]
    page = "--find-links https://download.pytorch.org/whl/cpu/torch/"
    assert page in CPU.read_text().splitlines()


def test_the_cuda_lock_differs_from_the_cpu_lock_in_torch_and_its_gpu_packages_only():
    cpu, cuda = read_pins(CPU), read_pins(CUDA)
    assert cuda["torch"] == cpu["torch"].removesuffix("+cpu")
    assert {n for n in cuda.keys() - cpu.keys() if not GPU_ONLY.fullmatch(n)} == set()
    assert cpu.keys() <= cuda.keys()
    assert {n: (cpu[n], cuda[n]) for n in cpu if n != "torch" and cpu[n] != cuda[n]} == {}


def test_the_running_environment_is_installed_from_a_shipped_lock():
    # CI installs from the CPU lock; an environment resolved otherwise fails here
    installed = installed_versions()
    if lock_sha256(installed=installed) is None:
        closest = min(lock_files(), key=lambda p: len(mismatches(read_pins(p), installed)))
        pytest.fail(
            f"this environment matches no shipped lock; against {closest.name}: "
            f"{mismatches(read_pins(closest), installed)}. Install it with "
            f"`pip install -r requirements/{CPU.name} && pip install --no-deps -e .`"
        )


def test_lock_sha256_names_the_lock_whose_every_pin_is_installed(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(
        "# a lock\n--find-links https://example.org/\nnumpy==2.4.6 \\\n"
        "    --hash=sha256:" + "0" * 64 + "\n    # via fedmia\ntorch==2.13.0+cpu\n"
        "SQLAlchemy[asyncio]==2.0.58\n"
    )
    b.write_text("numpy==2.4.6\ntorch==2.13.0\n")
    assert read_pins(a) == {"numpy": "2.4.6", "torch": "2.13.0+cpu", "sqlalchemy": "2.0.58"}
    sha_b = hashlib.sha256(b.read_bytes()).hexdigest()
    assert lock_sha256([a, b], {"numpy": "2.4.6", "torch": "2.13.0", "extra": "1"}) == sha_b
    assert lock_sha256([a, b], {"numpy": "2.4.7", "torch": "2.13.0"}) is None
    assert lock_sha256([a, b], {"torch": "2.13.0"}) is None
    assert lock_sha256([], {"numpy": "2.4.6", "torch": "2.13.0"}) is None
    assert mismatches(read_pins(b), {"numpy": "2.4.7"}) == [
        "numpy: locked 2.4.6, installed 2.4.7",
        "torch: locked 2.13.0, installed nothing",
    ]


def test_read_pins_rejects_a_line_that_is_not_an_exact_pin(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==2.4.6\npandas>=2.1\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: 'pandas>=2.1' is not an exact pin"):
        read_pins(lock)


def test_no_locks_outside_a_source_checkout(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "x.txt").write_text("numpy==2.4.6\n")
    assert lock_files(tmp_path / "requirements") == []
    (tmp_path / "pyproject.toml").write_text("")
    assert lock_files(tmp_path / "requirements") == [tmp_path / "requirements" / "x.txt"]


def test_ci_runs_the_readme_test_command_which_installs_the_cpu_lock(repo):
    readme = (repo / "README.md").read_text()
    found = re.search(r"Set up and run the tests[^\n]*\n\n```bash\n([^\n]+)\n```", readme)
    assert found, "README.md lost its 'Set up and run the tests' command"
    command = found.group(1)
    assert f"pip install -r requirements/{CPU.name} && pip install --no-deps -e ." in command
    assert command in (repo / ".ci" / "run").read_text().splitlines()
