"""Shared fixtures: tiny models made once per session, engines built through the real loader."""

from __future__ import annotations

from pdserve.grpc_fork import turn_off_grpc_fork_handlers

turn_off_grpc_fork_handlers()  # before anything imports grpc: Ray forks its daemons from this process

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine.tiny_model import ModelShape, make_model  # noqa: E402


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """``make_tiny_model(arch)`` → a model directory, made once per architecture per session."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_model(tmp_path_factory.mktemp(f"model-{arch}"), ModelShape(arch=arch))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def model_dir(make_tiny_model):
    """The tiny Llama the service tests serve."""
    return make_tiny_model("llama")


@pytest.fixture
def redis_server(tmp_path):
    from pdserve.local_redis import LocalRedis

    server = LocalRedis(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(service):
    """A gRPC + HTTP client of the module's ``service`` fixture (a running pdserve)."""
    from service_client import ServiceClient

    c = ServiceClient(service)
    yield c
    c.close()


def pytest_terminal_summary(terminalreporter):
    """Where the run's time went, by module (what to merge or trim to keep CI inside its 30 minutes); then free
    disk and memory as the run ends: a CI machine short of either fails every later deploy alike."""
    import shutil
    import tempfile
    from collections import Counter

    seconds = Counter()  # every phase's report (setup, call, teardown: module fixtures' starts and stops included)
    for report in (r for reports in terminalreporter.stats.values() for r in reports if hasattr(r, "duration")):
        seconds[report.nodeid.split("::", 1)[0]] += report.duration
    terminalreporter.write_sep("=", f"seconds by module ({seconds.total():.0f} s in all)")
    for module, spent in seconds.most_common():
        terminalreporter.write_line(f"{spent:8.1f} s  {module}")

    free_disk = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    free_memory = int(meminfo["MemAvailable"].split()[0]) / 2**20
    terminalreporter.write_line(f"free at the end: {free_disk:.1f} GiB disk ({tempfile.gettempdir()}), "
                                f"{free_memory:.1f} GiB memory")  # fmt: skip
