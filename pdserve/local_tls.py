"""Throwaway TLS certificates for servers on this machine's loopback (a local Redis with ``tls``, the KV
transfer's TLS in tests), made by ``openssl``: nothing here needs the servers' own packages."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificates(workdir: Path) -> None:
    """A throwaway CA (ca.crt) and a server certificate for 127.0.0.1 (server.crt, server.key), by openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True, timeout=60)

    (workdir / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=pdserve-local-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
