"""A real two-node Slurm cluster on this host, for tests: munged + slurmctld + two slurmd (node1, node2).

Everything lives under one temporary folder (config, state, spool, logs, munge socket) and uses free ports, so it
neither needs nor touches a system Slurm. Both nodes are this machine (NodeHostname = `hostname -s`,
NodeAddr 127.0.0.1), which is enough to run real multi-node jobs: two `srun` tasks, two SLURM_NODEIDs, a real
rendezvous between them, signals, requeue (cred_expire=10: a requeued job may restart after 11 s, not 121 s).
Needs root (slurmd runs jobs as the submitting user) and the packages `slurmctld slurmd slurm-client munge`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
MUNGE_KEY = Path("/etc/munge/munge.key")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start on this machine (missing packages, not root, no munge key)."""


def unavailable_reason() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}): "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their user)"
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} is missing (created by the munge package; or run: mungekey --create)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    nodes: tuple[str, ...] = ("node1", "node2")
    cpus_per_node: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, scontrol); jobs inherit it."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "log", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text("")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=2000 State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(f"""\
ClusterName=medtunetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.root}/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
MessageTimeout=20
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self._write_config()
        self._spawn(_exe("munged"), "-F", "--force", f"--socket={self.root}/munge.socket",
                    f"--key-file={MUNGE_KEY}", f"--pid-file={self.root}/munged.pid",
                    f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munged.seed")
        self._wait(lambda: (self.root / "munge.socket").exists(), 15, "munged socket")
        self._spawn(_exe("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld")
        for node in self.nodes:
            self._spawn(_exe("slurmd"), "-D", "-N", node, "-f", str(self.conf))
        self._wait(self._nodes_idle, timeout, "both slurmd idle")
        return self

    def _nodes_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        return out.count("idle") == len(self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{dead[0]} exited while waiting for {what}; logs: {self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out waiting for {what}; logs: {self.logs()}")

    def _run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def sbatch(self, *args: str, cwd: str | Path, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self._run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}; logs: {self.logs()}")

    def scancel(self, *args: str) -> None:
        self._run("scancel", *args, check=True)

    def logs(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        self._run("scancel", "--full", "--partition=debug")  # jobs first, so no task outlives its slurmd
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
