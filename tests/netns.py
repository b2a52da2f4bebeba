"""A Ray cluster whose nodes sit in their own network namespaces on this machine, joined by a bridge.

The head (and the test, its driver) stays in the root namespace on the bridge's
address; each other node gets a namespace, a veth pair into the bridge and its
own address, so what travels between nodes crosses real interfaces, where
``tc`` adds delay and loss (``netem``, or ``tbf`` on kernels built without
netem) and ``ip link set … down`` cuts a node off.
Needs root and iproute2 (CI runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BRIDGE = "pdbr0"
SUBNET = "10.77.0"
HEAD_IP = f"{SUBNET}.1"
RAY = str(Path(sys.executable).with_name("ray"))
NETEM = ("netem", "delay", "20ms", "5ms", "loss", "1%")
TBF = ("tbf", "rate", "8mbit", "burst", "8kb", "latency", "20ms")


def _run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def why_not() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = "pdprobe"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class NetnsCluster:
    """``nodes``: name → Ray custom resources of that node; the head gets ``head_resources``."""

    def __init__(self, nodes: dict[str, dict[str, float]], head_resources: dict[str, float], cpus: int = 2):
        self.nodes = nodes
        self.head_resources = head_resources
        self.cpus = cpus
        self.port = 6390
        self.ips = {name: f"{SUBNET}.{i}" for i, name in enumerate(nodes, start=2)}

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def up(self) -> NetnsCluster:
        self.down()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{HEAD_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for name, ip in self.ips.items():
            ns, host_end = self.namespace(name), self.link(name)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", host_end, "master", BRIDGE, "up")
            self.exec(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.exec(name, "ip", "link", "set", "eth0", "up")
            self.exec(name, "ip", "link", "set", "lo", "up")
        self._ray_start(None, "--head", "--include-dashboard=false", f"--port={self.port}",
                        f"--node-ip-address={HEAD_IP}", f"--resources={json.dumps(self.head_resources)}")  # fmt: skip
        for name, ip in self.ips.items():
            self._ray_start(name, f"--address={self.address}", f"--node-ip-address={ip}",
                            f"--resources={json.dumps(self.nodes[name])}")  # fmt: skip
        return self

    def down(self) -> None:
        _run(RAY, "stop", "--force", check=False)
        for name in self.nodes:
            _run("ip", "netns", "del", self.namespace(name), check=False)
        _run("ip", "link", "del", BRIDGE, check=False)

    def exec(self, name: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.namespace(name), *command, check=check)

    def impair(self, name: str) -> str:
        """A bad link on the node's interface: ``tc netem`` delay and loss where the kernel has netem,
        else ``tc tbf``, a rate limit whose full queue drops packets (loss) and holds the rest (delay).
        Returns what was applied."""
        for spec in (NETEM, TBF):
            applied = self.exec(name, "tc", "qdisc", "replace", "dev", "eth0", "root", *spec, check=False)
            if applied.returncode == 0:
                return " ".join(spec)
        raise RuntimeError(f"tc could not impair {name}: {applied.stderr.strip()}")

    def clear(self, name: str) -> None:
        self.exec(name, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def cut(self, name: str) -> None:
        _run("ip", "link", "set", self.link(name), "down")

    def mend(self, name: str) -> None:
        _run("ip", "link", "set", self.link(name), "up")

    @staticmethod
    def namespace(name: str) -> str:
        return f"pd-{name}"

    @staticmethod
    def link(name: str) -> str:
        return f"pdv-{name}"[:15]

    def _ray_start(self, name: str | None, *args: str) -> None:
        # Gloo finds its peers by the interface named here, not by the host name (the root namespace's).
        env = ["env", "RAY_AUTH_MODE=token", "GLOO_SOCKET_IFNAME=eth0" if name else f"GLOO_SOCKET_IFNAME={BRIDGE}"]
        command = [*env, RAY, "start", f"--num-cpus={self.cpus}", "--disable-usage-stats", *args]
        if name is None:
            _run(*command, timeout=180)
        else:
            self.exec(name, *command)
