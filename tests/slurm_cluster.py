"""A real one-node slurm cluster on this machine, for the tests of `configs/slurm/` (marker `slurm`).

Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`; `.ci/run` installs them): a private munged,
slurmctld and slurmd with their configuration, state, logs and job-completion record in a temporary
folder and on free ports, so that nothing of the machine's own slurm (if any) is touched. Starting the
daemons needs root. `sbatch`, `squeue`, `scancel` and `scontrol` reach it through `SLURM_CONF`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
INSTALL = "apt-get install slurm-wlm munge (`.ci/run` does)"


def missing_reason() -> str | None:
    """Why this machine cannot run a local slurm, or None when it can."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"needs a local slurm ({', '.join(missing)} not found): {INSTALL}"
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSlurm:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs_in_queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def wait_until_idle(self, timeout: float = 600) -> None:
        """Until no job is pending or running."""
        deadline = time.monotonic() + timeout
        while self.jobs_in_queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurm jobs still queued after {timeout:.0f} s: {self.jobs_in_queue()}")
            time.sleep(0.5)

    def finished(self) -> dict[str, dict[str, str]]:
        """Every finished job by id (an array task has its own, and `ArrayJobId`), with its `Name`, `JobState`
        and `ExitCode`, from slurmctld's job-completion record."""
        record = self.root / "jobcomp.txt"
        jobs = {}
        for line in record.read_text().splitlines() if record.exists() else []:
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs[fields["JobId"]] = fields
        return jobs


def start(root: Path) -> LocalSlurm:
    """Start munged, slurmctld and slurmd in `root`; their pids are in `root/*.pid`."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir(exist_ok=True)
    key = root / "munge" / "munge.key"
    subprocess.run(
        ["mungekey", "--create", "--keyfile", str(key), "--force"], check=True, capture_output=True
    )
    key.chmod(0o400)
    socket_path = root / "munge" / "munge.socket"
    subprocess.run(
        [
            "munged",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'munge' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'seed'}",
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=cocomix-tests",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={socket_path}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={root / 'jobcomp.txt'}",
                # As the issue found on a machine like this one: no cgroups in a container.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobRequeue=1",
                "SchedulerType=sched/builtin",  # event driven: a dependency resolves as its job ends
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "KillWait=30",
                f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], env=env, check=True, capture_output=True)
    cluster = LocalSlurm(root, env)
    deadline = time.monotonic() + 60
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout:
        if time.monotonic() > deadline:
            stop(cluster)
            raise RuntimeError(f"the local slurm node never became idle; logs in {root / 'log'}")
        time.sleep(0.5)
    return cluster


def stop(cluster: LocalSlurm) -> None:
    cluster.run("scancel", "--full", "--user=root", check=False)
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        path = cluster.root / pid_file
        if path.exists():
            try:
                os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@contextlib.contextmanager
def running(root: Path) -> Iterator[LocalSlurm]:
    """A cluster started in `root` for a test fixture, stopped after it; the tests are skipped, with the
    reason, on a machine that cannot run one."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = start(root)
    try:
        yield cluster
    finally:
        stop(cluster)
