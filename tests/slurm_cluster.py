"""A one-node Slurm cluster for the tests: munged, slurmctld and slurmd of Debian's
``slurm-wlm`` (22.05), run as root from a private directory and stopped afterwards.

Nothing is installed here (``scripts/setup_slurm.sh`` does that, as root, where apt works):
:func:`unavailable` says why a machine cannot run it, and the tests skip with that reason.
The node has this machine's CPUs, no GPUs (a CPU-only partition), and
``proctrack/linuxproc`` + ``task/none`` so no cgroup set-up is needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sacct")


def unavailable() -> str | None:
    """Why a one-node Slurm cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user)"
    missing = [
        name
        for name in DAEMONS
        if name != "sacct" and shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "run scripts/setup_slurm.sh as root"
        )
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    """One node (this machine), one partition ``cpu``; ``env`` points clients at it."""

    root: Path
    node: str = field(default_factory=socket.gethostname)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    processes: list[subprocess.Popen] = field(default_factory=list)
    # Fresh job ids: MPICH names its segments after JOBID.STEPID, and a segment left by an
    # earlier cluster's job of the same id would be opened by this one.
    first_job_id: int = field(
        default_factory=lambda: 100000 + int.from_bytes(os.urandom(3), "little")
    )

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    def _write_config(self) -> None:
        for name in ("state", "spool", "munge", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o700)
        ctld, slurmd = _free_port(), _free_port()
        (self.root / "slurm.conf").write_text(f"""\
ClusterName=spmdtest
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
FirstJobId={self.first_job_id}
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName={self.node} CPUs={self.cpus} State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60.0) -> None:
        self._write_config()
        socket_path = self.root / "munge" / "munge.socket"
        self.munge_env = {"MUNGE_SOCKET": str(socket_path)}
        self._spawn(
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={self.root}/munge/munge.key",
                f"--socket={socket_path}",
                f"--pid-file={self.root}/munge/munged.pid",
                f"--log-file={self.root}/log/munged.log",
                f"--seed-file={self.root}/munge/seed",
            ]
        )
        self._wait(socket_path.exists, timeout, "munged did not start")
        self._spawn([_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.root / "slurm.conf")])
        self._spawn([_which("slurmd"), "-D", "-f", str(self.root / "slurm.conf")])
        self._wait(self._node_idle, timeout, "the Slurm node did not come up")

    def _spawn(self, command: list[str]) -> None:
        log = open(self.root / "log" / (Path(command[0]).name + ".out"), "ab")  # noqa: SIM115 - kept open
        self.processes.append(
            subprocess.Popen(
                command, stdout=log, stderr=log, env=self.daemon_env, start_new_session=True
            )
        )

    @property
    def daemon_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, **getattr(self, "munge_env", {})}

    def _node_idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{process.args[0]} exited with {process.returncode}: {self.logs()}"
                )
        done = self.run("sinfo", "-h", "-o", "%t", check=False)
        return (
            done.returncode == 0
            and done.stdout.strip() in ("idle", "idle*")
            and "*" not in done.stdout
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:g} s: {self.logs()}")
            time.sleep(0.3)

    def run(
        self,
        *command: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**self.daemon_env, **(env or {})},
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
        return done

    def job_state(self, job_id: str) -> str:
        done = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for part in done.stdout.split():
            if part.startswith("JobState="):
                return part.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        done = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for part in done.stdout.split():
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
        return None

    def logs(self) -> str:
        texts = []
        for path in sorted((self.root / "log").glob("*")):
            texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(texts)

    def requeue(self, job_id: str, timeout: float = 60.0) -> None:
        """``scontrol requeue`` a running job and let it start again soon (Slurm holds a
        requeued job back for a while before it is eligible again). Not in the same second as
        the requeue: slurmd compares the new launch's credential with the old one's revocation
        to the second, and a launch within it is killed as "Job credential revoked"."""
        self.run("scontrol", "requeue", job_id)
        deadline = time.monotonic() + timeout
        while (
            self.job_state(job_id) not in ("PENDING", "RUNNING", "COMPLETED")
            and time.monotonic() < deadline
        ):
            time.sleep(0.3)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2", check=False)

    def stop(self) -> None:
        """Cancel every job, wait for their steps to end (a step outlives its slurmd), then
        stop the daemons."""
        if self.processes:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 40
            while (
                self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline
            ):
                time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
