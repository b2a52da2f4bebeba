"""A real redis-server on a free loopback port, started and stopped as a subprocess.

Used by the tests and benchmarks, and by ``pdserve`` when the index URL says ``local``.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from pdserve.local_tls import make_certificates

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 20000  # above Ray's worker ports (10002–19999 by default)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where there is room: a port the kernel
    handed out for binding port 0 may be handed out again as the source port of an outgoing connection (Ray
    opens many) before the server meant for it binds it, and that server then fails with EADDRINUSE."""
    first_ephemeral = int(_EPHEMERAL_RANGE.read_text().split()[0]) if _EPHEMERAL_RANGE.exists() else 32768
    if first_ephemeral > _LOWEST_PORT:
        for port in random.sample(range(_LOWEST_PORT, first_ephemeral), k=100):
            if _bindable(port):
                return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisServerError(RuntimeError):
    pass


class LocalRedis:
    """``tls=True`` serves ``rediss://`` only, with a CA and certificate made here by ``openssl``."""

    def __init__(
        self, workdir: Path, password: str | None = None, user: str | None = None, unix: bool = False, tls: bool = False
    ):
        if shutil.which("redis-server") is None:
            raise RedisServerError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.user = user
        self.socket_path = workdir / "redis.sock" if unix else None
        self.tls = tls
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = ""
        if self.password:
            auth = f"{self.user or ''}:{self.password}@"
        if self.socket_path:
            return f"unix://{auth}{self.socket_path}"
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.workdir / 'ca.crt'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.tls:
            make_certificates(self.workdir)
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"]
        else:
            args += ["--port", str(self.port)]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password and self.user:
            args += ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
        elif self.password:
            args += ["--requirepass", self.password]
        log_path = self.workdir / "redis-server.log"
        with log_path.open("w") as log_file:
            self._process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url)
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._process.poll() is not None:
                    said = " ".join(log_path.read_text().split())[-300:]
                    raise RedisServerError(f"redis-server exited ({self._process.returncode}): {said}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError("redis-server did not start in 10 s") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, signal_number: int = signal.SIGTERM) -> None:
        """End the server (SIGKILL: as a crash would); ``start`` brings it back, empty, on the same port."""
        if self._process is not None:
            self._process.send_signal(signal_number)
            self._process.wait(timeout=10)
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: the server holds its data and its connections but answers nothing, as in a partition."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)
