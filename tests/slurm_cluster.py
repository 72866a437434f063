"""A one-node SLURM cluster on this machine, and the tiny workflow run through the SLURM
profile on it in the background (tests/test_slurm.py checks the runs).

:class:`SlurmSession` uses a SLURM that already answers ``sinfo`` on this machine, or
starts one (root only): it writes ``/etc/slurm/slurm.conf`` when that file is absent or was
written by these tests (a slurm.conf without their first line is used as it is, never
overwritten), creates the munge key if missing, starts munged, slurmctld and slurmd in the
foreground, waits for an idle node and, at the end, stops exactly the daemons it started,
by PID. The file it wrote stays, so that a later session (or ``sinfo`` by hand) finds the
same cluster.

All of it happens in a thread: :meth:`SlurmSession.start` returns at once, the thread
starts the cluster (munged, slurmctld and slurmd come up in ~11 s, most of it waiting for
the node to register) and then the profile's runs. The runs wait on SLURM's job-state
checks most of the time and take one core at most, so the rest of the test session runs
beside them (conftest's ``slurm_session`` starts them at the first test, tests/
test_slurm.py asks for them last). What starts a snakemake process waits for the cluster
first (:meth:`SlurmSession.wait_until_up`, conftest's ``snakemake_cmd``): the tests that
start none run meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
# The first line of the slurm.conf the tests write (the file name as it was when they were
# in tests/test_slurm.py: a file written then is still theirs).
MARKER = "# Written by fedmia's tests/test_slurm.py"
# One test session at a time uses (and, at its end, stops) the daemons of this machine.
LOCK = Path(tempfile.gettempdir()) / "fedmia-slurm-test.lock"
CLIENTS = ("sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
# The test cluster's own state (slurmctld refuses state saved by another ClusterName).
STATE = Path("/var/lib/slurm/fedmia-test")
UP = {"idle", "mixed", "allocated"}  # a node that responds and takes jobs (not down*, drained)
TARGET = "results/tables/attacks.csv"
TIMEOUT_S = 1800  # per snakemake run; a hung run fails instead of blocking CI


class ClusterError(RuntimeError):
    """SLURM could not be started or did not come up."""


class RunTimeout(RuntimeError):
    """A snakemake run went over its time limit (it was killed, its SLURM jobs cancelled)."""


def run_cmd(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout} s")


def process_running(name: str) -> bool:
    """Whether a process with this command name runs on this machine."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name:
                return True
    return False


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def node_states() -> dict[str, str]:
    """``{node: state}`` from sinfo (``idle``, ``down*``, …); empty if sinfo fails."""
    r = run_cmd("sinfo", "--noheader", "--Node", "--format=%N %T", timeout=30)
    if r.returncode != 0:
        return {}
    return dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)


def slurm_conf(host: str, cpus: int, memory_mb: int) -> str:
    """A one-node cluster on 127.0.0.1: no accounting, no cgroups, root runs everything."""
    return f"""{MARKER}: a one-node test cluster on this machine.
# The tests rewrite this file; they never touch a slurm.conf without the line above.
ClusterName=fedmia
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# A request larger than the node fails at sbatch instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue (the profile's status command) for 5 minutes.
MinJobAge=300
MailProg=/bin/true
StateSaveLocation={STATE}/slurmctld
SlurmdSpoolDir={STATE}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def memory_mb() -> int:
    """This machine's memory in MiB, as slurmd counts it (MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("no MemTotal in /proc/meminfo")


@dataclass
class SlurmCluster:
    """The daemons this session started (``started``) and what it found (``notes``)."""

    logs: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        if any(s in UP for s in node_states().values()):
            self.notes.append("SLURM was already running: used as it is, not stopped")
            return
        if os.geteuid() != 0:
            raise ClusterError("SLURM is not running here and starting its daemons needs root")
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise ClusterError(
                f"SLURM daemons not installed: {', '.join(missing)} "
                "(Debian: apt-get install slurm-wlm munge)"
            )
        self.write_config()
        if not process_running("munged"):
            self.start_munged()
        if not process_running("slurmctld"):
            for d in ("slurmctld", "slurmd"):
                (STATE / d).mkdir(parents=True, exist_ok=True)
            self.start_daemon("slurmctld", "-D")
        if not process_running("slurmd"):
            self.start_daemon("slurmd", "-D")
        self.wait_until_up(timeout=90)

    def write_config(self) -> None:
        if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(MARKER):
            self.notes.append(f"{SLURM_CONF} was not written by these tests: used as it is")
            return
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        SLURM_CONF.write_text(slurm_conf(host, os.cpu_count() or 1, memory_mb()))

    def start_munged(self) -> None:
        user = "munge" if user_exists("munge") else None
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            MUNGE_KEY.chmod(0o400)
            if user:
                shutil.chown(MUNGE_KEY.parent, user, user)
                shutil.chown(MUNGE_KEY, user, user)
            self.notes.append(f"created {MUNGE_KEY}")
        socket_dir = Path("/run/munge")
        socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if user:
            shutil.chown(socket_dir, user, user)
        self.start_daemon("munged", "--foreground", user=user)
        deadline = time.monotonic() + 20
        while run_cmd("munge", "-n").returncode != 0:
            self.check_started()
            if time.monotonic() > deadline:
                raise ClusterError("munged did not answer `munge -n` within 20 s")
            time.sleep(0.5)

    def start_daemon(self, name: str, *args: str, user: str | None = None) -> None:
        with (self.logs / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                [name, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=user,
                group=user,
            )
        self.started.append((name, proc))

    def check_started(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                raise ClusterError(f"{name} (pid {proc.pid}) exited with {proc.returncode}")

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(s in UP for s in node_states().values()):
            self.check_started()
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no SLURM node became idle within {timeout:.0f} s "
                    f"(sinfo: {node_states() or 'no answer'})"
                )
            time.sleep(1)

    def stop(self) -> None:
        """Stop the daemons this session started, newest first, by PID."""
        for name, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.notes.append(f"stopped {name} (pid {proc.pid})")
        self.started.clear()

    def diagnostics(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            parts.append(
                f"--- {log.name} (last 40 lines) ---\n"
                + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            )
        for argv in (("sinfo", "--list-reasons"), ("scontrol", "show", "node")):
            r = run_cmd(*argv)
            parts.append(f"--- {' '.join(argv)} ---\n{r.stdout}{r.stderr}")
        return "\n".join(parts)


@contextlib.contextmanager
def machine_lock(timeout: float = 3600) -> Iterator[None]:
    """Wait while another test session on this machine uses SLURM."""
    fd = os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"another test session held {LOCK} for {timeout:.0f} s"
                    ) from e
                time.sleep(5)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Run:
    """One snakemake process, its output in a file (``out`` once finished)."""

    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    out: str = ""
    t0: float = 0.0
    seconds: float = 0.0

    def start(self) -> Run:
        self.t0 = time.monotonic()
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                self.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def finish(self, timeout: float = TIMEOUT_S) -> Run:
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.seconds = time.monotonic() - self.t0
        self.out = self.log.read_text(errors="replace")
        if self.returncode is None:
            for run_id in re.findall(r"SLURM run ID: (\S+)", self.out):
                run_cmd("scancel", "--name", run_id)
            raise RunTimeout(f"snakemake ran over {timeout} s: {self.argv}\n{self.out[-5000:]}")
        return self


def tiny_run_argv(snakemake_cmd, wd: Path, *args: str) -> list[str]:
    """The tiny config in the clone ``wd``, its Snakefile and config, ``args`` after."""
    # The target comes first: options such as --set-resources take every value after them.
    # --config threads=1: torch's thread count is the rule's `threads` (config `threads`,
    # workflow/rules/{train,measure}.smk -> pipeline.setup_compute), so the SLURM run uses
    # one thread, as the local run (the tiny config says 1), and computes the same floats.
    return [
        *snakemake_cmd,
        TARGET,
        "-s",
        str(wd / "Snakefile"),
        "-d",
        str(wd),
        "--configfile",
        str(wd / ".test" / "config" / "config.yaml"),
        "--config",
        "threads=1",
        *args,
    ]


def slurm_args(wd: Path, *set_resources: str) -> list[str]:
    """The profile of the clone ``wd``, with requests this machine can grant (it asks
    8-32 GB and hours).

    A command-line list replaces the profile's whole list, so train and measure are
    repeated here.
    """
    return [
        "--profile",
        str(wd / "profiles" / "slurm"),
        "--default-resources",
        "mem_mb=2000",
        "runtime=30",
        "--set-resources",
        "train:mem_mb=2000",
        "train:runtime=30",
        "measure:mem_mb=2000",
        "measure:runtime=30",
        *set_resources,
        # The plugin checks job states 40 s after a job ends or starts, then 10 s
        # later than the last wait each time (sized for big clusters); these jobs
        # take 5-11 s: checks after 1 and 12 s (the least it allows) catch most of them.
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
    ]


class SlurmSession:
    """The cluster (:class:`SlurmCluster`, under :func:`machine_lock`) and then the tiny
    config through the profile in the clone ``slurm_wd``, in a thread: first with the
    partition rule sent to a partition that does not exist (prepare runs, partition cannot
    be submitted), then fixed (the rerun must continue from the prepared data).

    :meth:`start` never raises and never waits: :meth:`wait_until_up` waits for the cluster
    (or for its failure), and what went wrong is raised by :meth:`result`, in the test that
    asks for the runs.
    """

    def __init__(self, snakemake_cmd: list[str], daemon_logs: Path, slurm_wd: Path) -> None:
        self.snakemake_cmd = snakemake_cmd
        self.slurm_wd = slurm_wd
        self.cluster = SlurmCluster(daemon_logs)
        self.error: BaseException | None = None
        self.runs: dict[str, Run] = {}
        self._stack = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # a run starts, or the session stops: not both
        self._stopping = False
        self._up = threading.Event()  # the cluster is up, or will not be

    def start(self) -> None:
        """Start the thread that starts the cluster (waiting for the machine's lock), then
        the runs; return at once."""
        missing = [c for c in CLIENTS if shutil.which(c) is None]
        if missing:
            self.error = ClusterError(
                f"SLURM client commands not found: {', '.join(missing)} "
                "(Debian: apt-get install slurm-wlm munge)"
            )
            self._up.set()
            return
        self._thread = threading.Thread(target=self._run, name="slurm-runs", daemon=True)
        self._thread.start()

    def wait_until_up(self) -> None:
        """Wait until the cluster answers, or failed to start (then the error is
        :meth:`result`'s; a snakemake process started now only waits ~10 s longer)."""
        self._up.wait()

    def _start_cluster(self) -> bool:
        """Start the cluster under the machine's lock: whether it is up."""
        try:
            self._stack.enter_context(machine_lock())
            self._stack.callback(self.cluster.stop)
            self.cluster.start()
        except BaseException as e:  # raised again by result(), in the test
            self.error = (
                ClusterError(f"{e}\n{self.cluster.diagnostics()}")
                if isinstance(e, ClusterError)
                else e
            )
            self._stack.close()
            return False
        return True

    def _run(self) -> None:
        try:
            up = self._start_cluster()
        finally:
            self._up.set()
        if not up:
            return
        wd = self.slurm_wd
        argvs = {
            "broken": tiny_run_argv(
                self.snakemake_cmd, wd, *slurm_args(wd, "partition:slurm_partition=nope")
            ),
            "fixed": tiny_run_argv(self.snakemake_cmd, wd, *slurm_args(wd)),
        }
        try:
            for name, argv in argvs.items():
                with self._lock:
                    if self._stopping:
                        return
                    run = self.runs[name] = Run(argv, wd / f"{name}.out").start()
                run.finish()
        except BaseException as e:  # raised again by result(), in the test
            self.error = e

    def result(self) -> dict[str, Run]:
        """``{"broken": Run, "fixed": Run}`` once both finished; raises what went wrong
        (:class:`ClusterError` where SLURM is not there or did not start)."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.runs

    def stop(self, grace: float = 120) -> None:
        """Interrupt a run still going (a session that ended before the SLURM tests: as
        Ctrl-C, Snakemake cancels its SLURM jobs), then stop the daemons this session
        started and free the lock."""
        with self._lock:
            self._stopping = True
            for run in self.runs.values():
                if run.proc is not None and run.proc.poll() is None:
                    run.proc.send_signal(signal.SIGINT)
        if self._thread is not None:
            self._thread.join(timeout=grace)
            for run in self.runs.values():
                if run.proc is not None and run.proc.poll() is None:
                    run.proc.kill()
            self._thread.join()
        self._stack.close()
