#!/usr/bin/env python3
"""A SLURM cluster of real hosts on one Linux machine, to try carat's cluster recipes before paying for a cluster.

    sudo cluster/testbed/up             # a controller `ctl` and compute hosts node1, node2
    cluster/testbed/on ctl sbatch --nodes=2 cluster/slurm/ray.sbatch
    cluster/testbed/on node2 ps -ef     # any command on any host
    cluster/testbed/down                # every daemon stopped, every namespace and link removed

Each host is a network namespace with its own address on a private bridge (the addresses exist only inside
the namespaces made here), its own host name, process tree (a PID namespace whose init is this script) and
mounts: a private /tmp/ray and /dev/shm (Ray's per-node state, as on a real node) and Debian's /etc/hosts, where
a host's own name maps to 127.0.1.1. The rest of the machine's file system is shared by every host, as NFS or
Lustre would be. The controller runs munged and slurmctld, each compute
host slurmd and sshd (a key made for the testbed, so DeepSpeed's pdsh/ssh launcher reaches the other hosts).
Nothing touches the machine's own SLURM, munge, sshd or Ray: the testbed's config lives in its state folder
and its daemons listen only inside its namespaces. Stdlib only: it runs before carat is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STATE = Path(os.environ.get("CARAT_TESTBED_STATE", "/run/carat-testbed"))
SUBNET = os.environ.get("CARAT_TESTBED_SUBNET", "10.250.77")  # a /24 that exists only in the namespaces
PREFIX = "carat-tb"
SWITCH = f"{PREFIX}-switch"
BRIDGE = "br0"
CPUS_PER_NODE = int(os.environ.get("CARAT_TESTBED_CPUS", "2"))
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge", "sshd": "openssh-server",
            "ssh": "openssh-client", "pdsh": "pdsh", "ip": "iproute2", "nsenter": "util-linux",
            "unshare": "util-linux", "srun": "slurm-client"}
READY_TIMEOUT_S = 90
RAY_TMP = "/tmp/ray"  # each host mounts its own over it


class TestbedError(RuntimeError):
    """A testbed that cannot start, with what is missing."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    compute: bool

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def port(self) -> str:  # its cable's end on the switch (interface names are at most 15 characters)
        return f"tb-{self.name}"


def hosts(nodes: int) -> list[Host]:
    return [Host("ctl", f"{SUBNET}.254", compute=False)] + [
        Host(f"node{i}", f"{SUBNET}.{i}", compute=True) for i in range(1, nodes + 1)]


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


# -- prerequisites ---------------------------------------------------------------------------------------------
def check_prerequisites(install: bool) -> None:
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces, mounts, daemons): run it with sudo")
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if not find_tool(tool)})
    if missing and install and shutil.which("apt-get"):
        print(f"testbed: installing {' '.join(missing)} with apt-get", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if sh("apt-get", "install", "-y", "-q", *missing, check=False, env=env).returncode != 0:
            sh("apt-get", "update", "-q", env=env)
            sh("apt-get", "install", "-y", "-q", *missing, env=env)
        missing = sorted({pkg for tool, pkg in PACKAGES.items() if not find_tool(tool)})
    if missing:
        raise TestbedError(f"missing Debian packages: {' '.join(missing)} (apt-get install {' '.join(missing)})")
    probe = f"{PREFIX}-probe"
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        raise TestbedError(f"this machine cannot make network namespaces (`ip netns add`): {made.stderr.strip()}")


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d, name)).exists()),
                                      None)


# -- configuration files ---------------------------------------------------------------------------------------
def write_configs(all_hosts: list[Host]) -> None:
    for sub in ("munge", "slurm", "ssh", "etc", "logs"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    for host in all_hosts:
        (STATE / f"slurm/spool-{host.name}").mkdir(exist_ok=True)
    os.chmod(STATE, 0o755)
    key = STATE / "munge/munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    os.chmod(STATE / "munge", 0o700)
    (STATE / "slurm/slurm.conf").write_text(slurm_conf(all_hosts))
    write_ssh_files(all_hosts)
    for host in all_hosts:
        (STATE / f"etc/hosts.{host.name}").write_text(etc_hosts(host, all_hosts))


def slurm_conf(all_hosts: list[Host]) -> str:
    ctl = all_hosts[0]
    nodes = [h for h in all_hosts if h.compute]
    lines = [
        "# the carat testbed's SLURM (cluster/testbed/testbed.py writes it; `down` removes it)",
        "ClusterName=carat-testbed",
        f"SlurmctldHost={ctl.name}({ctl.address})",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={STATE}/munge/munge.socket",
        f"StateSaveLocation={STATE}/slurm/ctld",
        f"SlurmdSpoolDir={STATE}/slurm/spool-%n",
        f"SlurmctldPidFile={STATE}/slurm/slurmctld.pid",
        f"SlurmdPidFile={STATE}/slurm/slurmd-%n.pid",
        f"SlurmctldLogFile={STATE}/logs/slurmctld.log",
        f"SlurmdLogFile={STATE}/logs/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        # the hosts share this machine's cores: their declared sizes are the testbed's, not the hardware's
        "SlurmdParameters=config_overrides",
        "SlurmdTimeout=30", "KillWait=5", "MessageTimeout=10", "InactiveLimit=0", "MinJobAge=600",
    ]
    for node in nodes:
        lines.append(f"NodeName={node.name} NodeAddr={node.address} CPUs={CPUS_PER_NODE} RealMemory=4096 "
                     "State=UNKNOWN")
    lines.append(f"PartitionName=cpu Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE "
                 "State=UP")
    return "\n".join(lines) + "\n"


def etc_hosts(host: Host, all_hosts: list[Host]) -> str:
    """Debian's default: the host's own name on 127.0.1.1 (the trap a cluster script must not fall into), the
    others on their cluster addresses."""
    lines = ["127.0.0.1 localhost", f"127.0.1.1 {host.name}"]
    lines += [f"{h.address} {h.name}" for h in all_hosts if h != host]
    return "\n".join(lines) + "\n"


def write_ssh_files(all_hosts: list[Host]) -> None:
    ssh = STATE / "ssh"
    for path, kind in ((ssh / "host_key", "host"), (ssh / "id_ed25519", "client")):
        if not path.exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"carat-testbed-{kind}", "-f", str(path))
    shutil.copyfile(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    host_pub = (ssh / "host_key.pub").read_text().split()
    (ssh / "known_hosts").write_text("".join(
        f"{h.name},{h.address} {host_pub[0]} {host_pub[1]}\n" for h in all_hosts))
    (ssh / "ssh_config").write_text("\n".join([
        "# the testbed hosts' ssh client (bind-mounted over /etc/ssh/ssh_config inside them only)",
        "Host *",
        f"    IdentityFile {ssh}/id_ed25519",
        f"    UserKnownHostsFile {ssh}/known_hosts",
        "    StrictHostKeyChecking yes",
        "    BatchMode yes",
        "    ConnectTimeout 10",
        "    LogLevel ERROR",
    ]) + "\n")
    for host in all_hosts:
        (ssh / f"sshd_config.{host.name}").write_text("\n".join([
            # every address of the host (its namespace has only loopback and its testbed address)
            f"HostKey {ssh}/host_key",
            f"AuthorizedKeysFile {ssh}/authorized_keys",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PrintMotd no", "PidFile none",
            "Subsystem sftp internal-sftp",
        ]) + "\n")


# -- the network -----------------------------------------------------------------------------------------------
def make_network(all_hosts: list[Host]) -> None:
    sh("ip", "netns", "add", SWITCH)
    in_switch = ("ip", "-n", SWITCH)
    sh(*in_switch, "link", "add", BRIDGE, "type", "bridge")
    sh(*in_switch, "link", "set", BRIDGE, "up")
    for host in all_hosts:
        sh("ip", "netns", "add", host.netns)
        sh("ip", "-n", host.netns, "link", "add", "eth0", "type", "veth", "peer", "name", host.port,
           "netns", SWITCH)
        sh(*in_switch, "link", "set", host.port, "master", BRIDGE)
        sh(*in_switch, "link", "set", host.port, "up")
        sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", host.netns, "link", "set", "lo", "up")


def set_link(name: str, up: bool) -> None:
    """Plug or unplug a host's cable on the switch (a host unreachable for everyone else)."""
    sh("ip", "-n", SWITCH, "link", "set", f"tb-{name}", "up" if up else "down")


# -- hosts ---------------------------------------------------------------------------------------------------
def start_host(host: Host) -> int:
    """A host's init: this script, as PID 1 of new UTS, PID and mount namespaces inside the host's netns."""
    log = open(STATE / f"logs/init-{host.name}.log", "ab")
    proc = subprocess.Popen(
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup file systems slurmd needs
        ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--uts", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
         "--propagation", "private", sys.executable, str(Path(__file__).resolve()), "_init", host.name,
         "--compute" if host.compute else "--controller"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "CARAT_TESTBED_STATE": str(STATE)})
    return proc.pid


def host_init(name: str, compute: bool) -> None:
    """PID 1 of a host: its name and mounts, its daemons as children, reaping orphans until told to stop (the
    kernel then kills everything left in the host's PID namespace)."""
    socket.sethostname(name)
    # Per-node state that must not be shared: Ray's sockets and session files, shared memory. The rest of /tmp
    # stays the machine's (a checkout or a venv there must be visible to every host).
    mount_tmpfs(RAY_TMP, "1777")
    mount_tmpfs("/dev/shm", "1777")
    bind(STATE / f"etc/hosts.{name}", "/etc/hosts")
    bind(STATE / "ssh/ssh_config", "/etc/ssh/ssh_config")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory, if the package left none
    daemons = compute_daemons(name) if compute else controller_daemons()
    children = {}
    for label, argv in daemons:
        if label == "slurmctld":
            wait_for(lambda: (STATE / "munge/munge.socket").exists(), "munged's socket", 20)
        children[subprocess.Popen(argv, stdin=subprocess.DEVNULL).pid] = label
    (STATE / f"ready.{name}").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid in children:
            print(f"{name}: {children.pop(pid)} exited with status {status}", flush=True)


def controller_daemons() -> list[tuple[str, list[str]]]:
    munge = STATE / "munge"
    return [
        ("munged", [find_tool("munged"), "--foreground", "--force", f"--socket={munge}/munge.socket",
                    f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                    f"--seed-file={munge}/munged.seed", f"--log-file={STATE}/logs/munged.log"]),
        ("slurmctld", [find_tool("slurmctld"), "-D", "-i", "-f", f"{STATE}/slurm/slurm.conf"]),
    ]


def compute_daemons(name: str) -> list[tuple[str, list[str]]]:
    return [
        ("sshd", [find_tool("sshd"), "-D", "-e", "-f", f"{STATE}/ssh/sshd_config.{name}"]),
        ("slurmd", [find_tool("slurmd"), "-D", "-N", name, "-f", f"{STATE}/slurm/slurm.conf"]),
    ]


def mount_tmpfs(target: str, mode: str) -> None:
    sh("mount", "-t", "tmpfs", "-o", f"mode={mode},size=50%", "tmpfs", target)


def bind(source: Path, target: str) -> None:
    sh("mount", "--bind", str(source), target)


def only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise TestbedError(f"expected one init process under {pid}, found {children}")
    return int(children[0])


def wait_for(ready, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


# -- commands ------------------------------------------------------------------------------------------------
def read_state() -> dict:
    path = STATE / "state.json"
    if not path.is_file():
        raise TestbedError(f"no testbed is up ({path} is missing): run cluster/testbed/up")
    return json.loads(path.read_text())


def host_command(name: str, argv: list[str], cwd: str | None = None) -> list[str]:
    state = read_state()
    if name not in state["hosts"]:
        raise TestbedError(f"no host {name!r} in the testbed (hosts: {', '.join(state['hosts'])})")
    pid = state["hosts"][name]["init"]
    return ["nsenter", "-t", str(pid), "-n", "-u", "-p", "-m", f"--wd={cwd or os.getcwd()}", *argv]


def up(nodes: int, install: bool) -> None:
    check_prerequisites(install)
    if (STATE / "state.json").is_file():
        state = read_state()
        if all(Path(f"/proc/{h.get('init', 0)}").exists() for h in state["hosts"].values()):
            print(f"testbed: already up ({', '.join(state['hosts'])})")
            return
    down()  # the leftovers of a crashed testbed (dead hosts, namespaces without state) go first
    all_hosts = hosts(nodes)
    write_configs(all_hosts)
    make_network(all_hosts)
    state = {"subnet": SUBNET, "hosts": {}, "made_ray_tmp": not Path(RAY_TMP).exists()}
    Path(RAY_TMP).mkdir(mode=0o1777, exist_ok=True)
    try:
        for host in all_hosts:
            launcher = start_host(host)
            state["hosts"][host.name] = {"pid": launcher, "address": host.address, "compute": host.compute}
            (STATE / "state.json").write_text(json.dumps(state, indent=1))
            wait_for(lambda h=host: (STATE / f"ready.{h.name}").exists(), f"host {host.name} to boot", 20)
            # `unshare` stays in the machine's PID namespace; its child, the host's init, is inside the host's
            state["hosts"][host.name]["init"] = only_child(launcher)
            (STATE / "state.json").write_text(json.dumps(state, indent=1))
        wait_until_ready([h for h in all_hosts if h.compute])
    except TestbedError as exc:
        raise TestbedError(f"{exc}\n{log_tails()}") from None
    print(f"testbed: up: {', '.join(f'{h.name} {h.address}' for h in all_hosts)}; "
          f"SLURM partition cpu ({nodes} nodes x {CPUS_PER_NODE} CPUs); state in {STATE}")


def wait_until_ready(nodes: list[Host]) -> None:
    def idle() -> bool:
        proc = subprocess.run(host_command("ctl", ["sinfo", "-h", "-N", "-o", "%N %t"], cwd="/"),
                              capture_output=True, text=True, env=slurm_env())
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(n.name) == "idle" for n in nodes)

    wait_for(idle, "every slurmd to register with slurmctld (idle)", READY_TIMEOUT_S)
    for src in nodes:
        for dst in nodes:
            proc = subprocess.run(host_command(src.name, ["ssh", dst.name, "hostname"], cwd="/"),
                                  capture_output=True, text=True, timeout=30)
            if proc.stdout.strip() != dst.name:
                raise TestbedError(f"ssh from {src.name} to {dst.name} failed: {proc.stderr.strip()}")


def slurm_env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(STATE / "slurm/slurm.conf")}


def log_tails() -> str:
    out = []
    for log in sorted((STATE / "logs").glob("*.log")) if (STATE / "logs").is_dir() else []:
        lines = log.read_text(errors="replace").splitlines()[-8:]
        out.append(f"--- {log}\n" + "\n".join(lines))
    return "\n".join(out)


def down() -> None:
    """Stop every host (its init, hence everything in its PID namespace), remove namespaces and state."""
    state_file = STATE / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"hosts": {}}
    for host in state["hosts"].values():
        stop_process(host["pid"])
    names = sh("ip", "netns", "list", check=False).stdout.split("\n")
    for line in names:
        netns = line.split(" ")[0]
        if netns.startswith(f"{PREFIX}-"):
            kill_netns_processes(netns)
            sh("ip", "netns", "del", netns, check=False)
    if STATE.exists():
        shutil.rmtree(STATE)
    if state.get("made_ray_tmp"):
        with contextlib.suppress(OSError):  # only if empty: a Ray of the machine's own may have come to use it
            os.rmdir(RAY_TMP)


def stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or zombie(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def kill_netns_processes(netns: str) -> None:
    pids = sh("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the testbed (idempotent)")
    p_up.add_argument("--nodes", type=int, default=2, help="compute hosts (default 2)")
    p_up.add_argument("--no-install", action="store_true", help="never apt-get install missing packages")
    sub.add_parser("down", help="stop and remove everything the testbed made")
    sub.add_parser("status", help="the hosts and SLURM's view of them")
    p_on = sub.add_parser("on", help="run a command on a host, in the current directory")
    p_on.add_argument("host")
    p_on.add_argument("argv", nargs=argparse.REMAINDER)
    p_link = sub.add_parser("link", help="plug (up) or unplug (down) a host's network cable")
    p_link.add_argument("host")
    p_link.add_argument("state", choices=("up", "down"))
    p_init = sub.add_parser("_init", help=argparse.SUPPRESS)
    p_init.add_argument("host")
    p_init.add_argument("--compute", action="store_true")
    p_init.add_argument("--controller", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.nodes, install=not args.no_install)
        elif args.command == "down":
            down()
            print("testbed: down")
        elif args.command == "status":
            state = read_state()
            for name, host in state["hosts"].items():
                alive = Path(f"/proc/{host.get('init', 0)}").exists()
                print(f"{name:6} {host['address']:15} {'up' if alive else 'DEAD'}")
            return subprocess.run(host_command("ctl", ["sinfo", "-N"], cwd="/"), env=slurm_env()).returncode
        elif args.command == "on":
            if not args.argv:
                parser.error("on HOST COMMAND...: a command is needed")
            argv = host_command(args.host, args.argv)
            os.execvpe(argv[0], argv, slurm_env())
        elif args.command == "link":
            set_link(args.host, args.state == "up")
        elif args.command == "_init":
            host_init(args.host, args.compute)
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
