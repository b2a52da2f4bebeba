"""A real redis-server on a free loopback port, started and stopped as a subprocess.

Used by the tests and benchmarks, and by ``pdserve`` when the index URL says ``local``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServerError(RuntimeError):
    pass


class LocalRedis:
    def __init__(self, workdir: Path, password: str | None = None, user: str | None = None, unix: bool = False):
        if shutil.which("redis-server") is None:
            raise RedisServerError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.user = user
        self.socket_path = workdir / "redis.sock" if unix else None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = ""
        if self.password:
            auth = f"{self.user or ''}:{self.password}@"
        if self.socket_path:
            return f"unix://{auth}{self.socket_path}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir)]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password and self.user:
            args += ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
        elif self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis(host="127.0.0.1", port=self.port, username=self.user, password=self.password)
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RedisServerError("redis-server did not start in 10 s") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
