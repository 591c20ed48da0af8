"""A real Slurm cluster on this machine for the ``slurm`` test tier.

The session fixture ``slurm_cluster`` installs Debian's slurm-wlm + munge when missing (via
``.ci/slurm-setup.sh``), then starts, all under one temp dir:

- ``munged`` with its own key and socket (``AuthInfo=socket=...``, so a system munged is untouched);
- two compute "hosts": network namespaces ``pmpslurm-node1``/``-node2`` joined by veth pairs to a bridge
  ``pmpslurm0`` that carries the private test subnet 10.213.0.0/24 (it exists only on this bridge; no
  other address is ever contacted). The bridge holds 10.213.0.1 for slurmctld, each namespace has its
  address on an interface named ``pmp0``;
- ``slurmctld`` in the root namespace and one ``slurmd -N nodeX`` per namespace (``NodeAddr`` = its
  address), each node with 2 CPUs and one fake GPU (``Gres=gpu:1``, ``File=/dev/null``), partition
  ``debug``. Jobs then really span two hosts: MASTER_ADDR is node1's address, rank 1 connects to it
  over the bridge.

Observed on these machines (gVisor sandbox, Debian 12, Slurm 22.05.8):
- ``ip netns exec NS slurmd`` FAILS: ``ip netns exec`` also unshares the mount namespace and remounts
  /sys, which hides /sys/fs/cgroup, and slurmd 22.05 then stops with "error: No filesystem mounted on
  /sys/fs/cgroup / error: Unable to initialize cgroup plugin / error: slurmd initialization failed"
  (even with proctrack/linuxproc and task/none). ``nsenter --net=/run/netns/NS slurmd`` enters only the
  network namespace and works.
- A GPU GRES without ``File=`` registers as 0 GPUs ("gres/gpu count reported lower than configured
  (0 < 1)" and the node drains); ``File=/dev/null`` registers one.
- A job requeued with ``scontrol requeue`` waits ~120 s (Reason=BeginTime) before it may start again;
  ``SlurmCluster.wait_job`` releases it at once with ``scontrol update JobId=J StartTime=now``.
- Gloo picks its interface from the hostname, which resolves to 127.0.0.1 in every namespace; the tests
  set ``GLOO_SOCKET_IFNAME=pmp0`` (exported into the jobs by sbatch).

If namespaces cannot be made (no root, no ``ip``, a sandbox that forbids them), the fixture falls back
to ONE node on 127.0.0.1 running 2 tasks (CPU-only, ``--gpus-per-node 0``) and records the failing
command and its error in ``SlurmCluster.fallback_reason`` (and as a warning in the test summary).
``PMP_SLURM_NO_NETNS=1`` forces that fallback.

Not root or no apt: the slurm tests are skipped with the reason, except under CI (``CI`` set), where
they fail. One session at a time per machine (a lock file serialises them).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / ".ci" / "slurm-setup.sh"
SUBNET = "10.213.0"  # private test subnet: exists only on the bridge this fixture creates
CTLD_ADDR = f"{SUBNET}.1"
BRIDGE = "pmpslurm0"
NODE_IFNAME = "pmp0"  # the interface name inside every node namespace
NODES = (("node1", "pmpslurm-node1", f"{SUBNET}.11", "pmpslurm-v1"),
         ("node2", "pmpslurm-node2", f"{SUBNET}.12", "pmpslurm-v2"))
LOCK_PATH = Path(tempfile.gettempdir()) / "pmp-slurm-tests.lock"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


def _run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Handle on the running test cluster: its config, topology and small job helpers."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.netns = False
        self.nodes: list[str] = []
        self.gpus_per_node = 0
        self.tasks_per_node = 2
        self.fallback_reason: str | None = None
        self.pid_files: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        """Variables that make slurm commands and jobs use this cluster and this venv."""
        env = {"SLURM_CONF": str(self.conf),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        if self.netns:
            env["GLOO_SOCKET_IFNAME"] = NODE_IFNAME
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(*cmd, check=check, env={**os.environ, **self.env})

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (first line for an array); {} once Slurm forgot it."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_job(self, job_id: str, timeout: float, expect: str = "COMPLETED") -> dict[str, str]:
        """Poll until the job is in a final state; release a requeued job from Slurm's ~120 s hold."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        held_since = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state.startswith(FINAL_STATES):
                assert state == expect, (f"job {job_id} ended {state}, expected {expect}: {info}\n"
                                         f"{self.log_tail(job_id)}")
                return info
            if state == "PENDING" and info.get("Reason") == "BeginTime" and int(info.get("Restarts", 0)):
                # Release it early, but not at once: slurmd refuses to relaunch a job id it killed a
                # moment ago ("Job N already killed, do not launch batch job") and the job then fails.
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 10:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {info}")

    def log_tail(self, job_id: str, chars: int = 3000) -> str:
        """The daemons' log lines that mention ``job_id`` (for failure messages)."""
        lines = []
        for log in sorted((self.root / "log").glob("*.log")):
            hits = [x for x in log.read_text(errors="replace").splitlines() if job_id in x or "error" in x]
            lines += [f"{log.name}: {x}" for x in hits[-20:]]
        return "\n".join(lines)[-chars:]

    def describe(self) -> str:
        topo = (f"{len(self.nodes)} nodes in network namespaces" if self.netns
                else f"1 node (fallback: {self.fallback_reason})")
        return f"local Slurm at {self.root}: {topo}, {self.tasks_per_node} task(s)/node"


# ----------------------------------------------------------------------------- setup steps


def _ensure_installed() -> None:
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "ip", "nsenter")
               if _which(c) is None]
    if not missing:
        return
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900)
    still = [c for c in missing if _which(c) is None]
    if proc.returncode != 0 or still:
        raise RuntimeError(f"{SETUP_SCRIPT.name} could not install {still or missing} "
                           f"(rc {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-1500:]}")


def _start_munge(root: Path) -> Path:
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o711)
    key = munge_dir / "munge.key"
    _run(_which("mungekey"), "--create", "--bits=1024", f"--keyfile={key}")
    sock = munge_dir / "munge.sock"
    pid_file = munge_dir / "munged.pid"
    _run(_which("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
         f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={pid_file}",
         f"--seed-file={munge_dir / 'munged.seed'}")
    return pid_file


def _cleanup_network() -> None:
    """Remove this fixture's namespaces and bridge (also leftovers of a crashed earlier session)."""
    for _, ns, _, veth in NODES:
        if Path(f"/run/netns/{ns}").exists():
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:  # a leftover of this fixture: slurmd/slurmstepd or a job task in our namespace
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "delete", ns, check=False)
        _run("ip", "link", "delete", veth, check=False)
    _run("ip", "link", "delete", BRIDGE, check=False)


def _make_network() -> None:
    """Bridge with CTLD_ADDR in the root namespace, one namespace per node wired to it by a veth pair."""
    _cleanup_network()
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{CTLD_ADDR}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    for _, ns, addr, veth in NODES:
        peer = f"{veth}p"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", ns)
        _run("ip", "link", "set", veth, "master", BRIDGE)
        _run("ip", "link", "set", veth, "up")
        inside = ("ip", "netns", "exec", ns, "ip")
        _run(*inside, "link", "set", peer, "name", NODE_IFNAME)
        _run(*inside, "addr", "add", f"{addr}/24", "dev", NODE_IFNAME)
        _run(*inside, "link", "set", NODE_IFNAME, "up")
        _run(*inside, "link", "set", "lo", "up")
    # Both directions of the path slurmd/srun use: node namespace -> bridge address and node -> node.
    probe = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); "
             "s.close()")
    with socket.socket() as server:
        server.bind((CTLD_ADDR, 0))
        server.listen()
        _run("nsenter", f"--net=/run/netns/{NODES[1][1]}", sys.executable, "-c", probe, CTLD_ADDR,
             str(server.getsockname()[1]))


def _write_conf(cluster: SlurmCluster, munge_sock: Path) -> None:
    root = cluster.root
    for sub in ("etc", "state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    ctld_addr = CTLD_ADDR if cluster.netns else "127.0.0.1"
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=pmptest",
        f"SlurmctldHost={host}({ctld_addr})",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_sock}",
        f"SlurmctldPort={_free_port(ctld_addr)}",
        f"SlurmdPort={6818 if cluster.netns else _free_port('127.0.0.1')}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "MinJobAge=600",
        "KillWait=5",
        "JobRequeue=1",
    ]
    if cluster.netns:
        lines.append("GresTypes=gpu")
        lines += [f"NodeName={name} NodeAddr={addr} CPUs=2 RealMemory=4000 Gres=gpu:1 State=UNKNOWN"
                  for name, _, addr, _ in NODES]
        (root / "etc" / "gres.conf").write_text("AutoDetect=off\nName=gpu File=/dev/null\n")
    else:
        lines.append("NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(cluster.nodes)} Default=YES MaxTime=INFINITE State=UP")
    cluster.conf.write_text("\n".join(lines) + "\n")


def _start_daemons(cluster: SlurmCluster) -> None:
    root, env = cluster.root, {**os.environ, "SLURM_CONF": str(cluster.conf)}
    _run(_which("slurmctld"), "-f", str(cluster.conf), env=env)
    cluster.pid_files.append(root / "slurmctld.pid")
    for name in cluster.nodes:
        (root / "spool" / name).mkdir()
        slurmd = [_which("slurmd"), "-f", str(cluster.conf), "-N", name]
        ns = dict((n, s) for n, s, _, _ in NODES)[name]
        prefix = ["nsenter", f"--net=/run/netns/{ns}"] if cluster.netns else []
        _run(*prefix, *slurmd, env=env)
        cluster.pid_files.append(root / f"slurmd-{name}.pid")
    deadline = time.monotonic() + 60
    states = ""
    while time.monotonic() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        if states.split() and all(line.split()[1] == "idle" for line in states.splitlines()):
            return
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "log").glob("*.log")))
    raise RuntimeError(f"Slurm nodes not idle after 60 s: {states!r}\n{logs}")


def _stop(cluster: SlurmCluster, munge_pid: Path | None) -> None:
    if cluster.conf.exists():
        cluster.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
    pids = []
    for pid_file in [*cluster.pid_files, *([munge_pid] if munge_pid else [])]:
        try:
            pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and not _zombie(pid):
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if cluster.netns:
        _cleanup_network()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _lock():
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + 900
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another session holds {LOCK_PATH} for more than 15 min") from None
            time.sleep(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start munged + slurmctld + 2 slurmd (one per network namespace); stop and remove all after."""
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    if os.geteuid() != 0:
        unavailable("the local Slurm cluster needs root (namespaces, slurmd as root)")
    try:
        _ensure_installed()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        unavailable(f"cannot install Slurm: {err}")
    lock = _lock()
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="pmp-slurm-")))
    munge_pid = None
    try:
        try:
            if os.environ.get("PMP_SLURM_NO_NETNS"):
                raise RuntimeError("network namespaces disabled by PMP_SLURM_NO_NETNS")
            _make_network()
            cluster.netns, cluster.nodes = True, [n for n, _, _, _ in NODES]
            cluster.gpus_per_node, cluster.tasks_per_node = 1, 1
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            _cleanup_network()
            cluster.fallback_reason = str(err)
            cluster.nodes = ["node1"]
            warnings.warn(f"slurm tests run on ONE node: network namespaces failed: {err}", stacklevel=1)
        munge_pid = _start_munge(cluster.root)
        _write_conf(cluster, cluster.root / "munge" / "munge.sock")
        _start_daemons(cluster)
        yield cluster
    finally:
        _stop(cluster, munge_pid)
        shutil.rmtree(cluster.root, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The cluster, with SLURM_CONF/PATH (and GLOO_SOCKET_IFNAME) set for this test only."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster
