"""A real Slurm cluster for tests: munged, slurmctld and one slurmd per node,
all run as root from one 0755 folder under /tmp and stopped by PID.

Nodes either share this machine's network (one node, 127.0.0.1) or each live
in their own network namespace with its own host name, joined by a veth pair,
so that two "hosts" run one Ray node each. slurmd enters a namespace through
`nsenter --net=... unshare --uts --mount` (not `ip netns exec`, which remounts
/sys and kills slurmd); inside, /etc/hosts is bind-mounted so host names resolve.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct", "srun")
APT_PACKAGES = "slurmctld slurmd slurm-client munge"


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SlurmNode:
    name: str
    addr: str = "127.0.0.1"
    cpus: int = 2
    netns: str | None = None  # a named network namespace (`ip netns add`) the node lives in


class NetnsPair:
    """Two network namespaces joined by a veth pair, loopback up in each."""

    def __init__(self, prefix: str = "tfs", subnet: str = "10.213.0"):
        tag = f"{prefix}{os.getpid() % 100000}"
        self.names = (f"{tag}a", f"{tag}b")
        self.addrs = (f"{subnet}.1", f"{subnet}.2")
        self.links = (f"{tag}va", f"{tag}vb")
        try:
            self._create()
        except subprocess.CalledProcessError:
            self.delete()
            raise

    def _create(self) -> None:
        for name in self.names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for name, link, addr in zip(self.names, self.links, self.addrs, strict=True):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")

    def delete(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` points clients at this cluster."""

    def __init__(self, nodes: list[SlurmNode]):
        self.nodes = nodes
        self.controller = nodes[0]
        self.base = Path(tempfile.mkdtemp(prefix="tf-slurm-", dir="/tmp"))
        self.base.chmod(0o755)  # munged wants every path component world-executable
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ setup
    def start(self, timeout_s: float = 60) -> SlurmCluster:
        try:
            self._write_files()
            base = self.base
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={base / 'munge.key'}", f"--pid-file={base / 'munged.pid'}",
                                   f"--log-file={base / 'munged.log'}", f"--seed-file={base / 'munged.seed'}"])
            self._wait_for(lambda: Path(self.munge_socket).exists(), "munged socket", timeout_s)
            self._spawn("slurmctld", self.in_node(self.controller, ["slurmctld", "-D", "-i", "-f", str(self.conf)]))
            for node in self.nodes:
                self._spawn(f"slurmd-{node.name}", self.in_node(node, ["slurmd", "-D", "-N", node.name,
                                                                         "-f", str(self.conf)]))
            self._wait_for(self._all_idle, "all nodes idle in sinfo", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def munge_socket(self) -> str:
        return str(self.base / "munge.socket")

    def _write_files(self) -> None:
        key = self.base / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.base / "state").mkdir()
        if any(node.netns for node in self.nodes):
            hosts = "127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in self.nodes)
            (self.base / "hosts").write_text(hosts)
        self.conf.write_text(self._slurm_conf())

    def _slurm_conf(self) -> str:
        base, ctl = self.base, self.controller
        ctl_host = ctl.name if ctl.netns else socket.gethostname()  # slurmctld checks its own host name
        node_lines = "".join(
            f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} Port={free_port()} "
            f"CPUs={n.cpus} RealMemory=1000 State=UNKNOWN\n" for n in self.nodes
        )
        return f"""ClusterName=tftest
SlurmctldHost={ctl_host}({ctl.addr})
MailProg=/bin/true
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc={base}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def in_node(self, node: SlurmNode, cmd: list[str]) -> list[str]:
        """`cmd` as run on `node`: inside its namespace, host name and /etc/hosts."""
        if node.netns is None:
            return cmd
        setup = f'mount --bind {self.base / "hosts"} /etc/hosts && hostname {node.name} && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount",
                "sh", "-c", setup, "sh", *cmd]

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / f"{name}.stdout", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _wait_for(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.diagnostics()}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"no {what} after {timeout_s:.0f} s:\n{self.diagnostics()}")

    def _all_idle(self) -> bool:
        probe = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
        states = dict(line.split() for line in probe.stdout.splitlines() if line.strip())
        return probe.returncode == 0 and all(states.get(n.name) == "idle" for n in self.nodes)

    # ------------------------------------------------------------------ use
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, ...) run where the controller is."""
        result = subprocess.run(self.client_cmd(list(cmd)), env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result

    def client_cmd(self, cmd: list[str]) -> list[str]:
        """Client commands only need the controller's network, not its host name."""
        if self.controller.netns is None:
            return cmd
        return ["nsenter", f"--net=/run/netns/{self.controller.netns}", *cmd]

    def job_fields(self, job_id: str) -> dict[str, str]:
        from tunefleet.cluster.slurm import parse_scontrol  # values such as paths may hold spaces

        return parse_scontrol(self.run("scontrol", "-o", "show", "job", job_id).stdout)

    def diagnostics(self) -> str:
        tails = []
        for log in sorted(self.base.glob("*.log")) + sorted(self.base.glob("*.stdout")):
            text = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    # ------------------------------------------------------------------ teardown
    def cancel_all_jobs(self, timeout_s: float = 60) -> None:
        """scancel every job of this cluster and wait until none is left running."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            probe = self.run("squeue", "--noheader", "--states=all", "--format=%T", check=False)
            active = [s for s in probe.stdout.split() if s in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING",
                                                                "REQUEUED", "SUSPENDED", "STOPPED")]
            if probe.returncode != 0 or not active:
                return
            time.sleep(0.5)

    def stop(self) -> None:
        self.cancel_all_jobs()
        for name in reversed(list(self.procs)):  # slurmd before slurmctld before munged
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
        shutil.rmtree(self.base, ignore_errors=True)
