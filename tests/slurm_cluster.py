"""A real single-node SLURM (slurmctld + slurmd + munge from Debian's packages) for the SLURM executor's tests.

Follows the tested recipe in shared/reference/orchestration.md §8: root, no systemd, no cgroups, no accounting
database, and two fake GPUs (character devices) declared as GRES so that the scripts' ``--gres=gpu:1`` lines are
scheduled for real (at most two GPU tasks at once). :func:`unavailable` says why the cluster cannot start here
(the tests skip with that reason, except in CI where they fail).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SlurmCluster", "unavailable", "start_cluster"]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
CONF_DIR = Path("/etc/slurm")


def unavailable() -> str | None:
    """Why a cluster cannot be started on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/munged and need root (CI runs as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    return None


@dataclass
class SlurmCluster:
    """The running daemons; :meth:`stop` ends them by the pids in their pid files."""

    work: Path
    pid_files: tuple[Path, ...]

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged."""
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
        for pid_file in self.pid_files:
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)


def _write_config(work: Path, cpus: int, mem_mb: int) -> None:
    gpus = work / "gpus"
    gpus.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        dev = gpus / f"fakegpu{i}"
        if not dev.exists():
            os.mknod(dev, 0o600 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    (CONF_DIR / "gres.conf").write_text(f"Name=gpu File={gpus}/fakegpu[0-1]\n")
    (CONF_DIR / "slurm.conf").write_text(f"""\
ClusterName=pipelinetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={work}/slurmctld
SlurmdSpoolDir={work}/slurmd
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd.pid
SlurmctldLogFile={work}/slurmctld.log
SlurmdLogFile={work}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
ReturnToService=2
MpiDefault=none
MinJobAge=600
KillWait=5
GresTypes=gpu
NodeName=localhost NodeHostname={socket.gethostname()} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:  # noqa: ANN001 - () -> bool
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not happen within {timeout:g} s\n{tail}")


def _node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
    return bool(out) and all(state in ("idle", "mix", "alloc") for state in out)


def start_cluster(work: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with state under ``work``; wait until the node is idle."""
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("slurmctld", "slurmd"):
        (work / sub).mkdir(exist_ok=True)
    run_munge = Path("/run/munge")
    run_munge.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_munge, "munge", "munge")
    subprocess.run(["munged", "--force", f"--pid-file={work}/munged.pid"], check=True, capture_output=True)
    cpus = os.cpu_count() or 2
    mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
    _write_config(work, cpus, mem_mb)
    subprocess.run(["slurmctld"], check=True, capture_output=True)
    subprocess.run(["slurmd", "-N", "localhost"], check=True, capture_output=True)
    cluster = SlurmCluster(work, (work / "slurmd.pid", work / "slurmctld.pid", work / "munged.pid"))
    try:
        _wait(_node_idle, 60, "the SLURM node becoming idle", work / "slurmd.log")
    except RuntimeError:
        subprocess.run(["scontrol", "update", "nodename=localhost", "state=resume"], capture_output=True)
        _wait(_node_idle, 30, "the SLURM node becoming idle after a resume", work / "slurmctld.log")
    return cluster
