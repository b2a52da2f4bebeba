"""The generated protobuf modules are committed; they must match the .proto sources."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protos_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True, timeout=120)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "pdserve_pb").rglob("*.py"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "pdserve_pb").rglob("*.py"))
    assert generated == committed
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"run `python scripts/gen_protos.py`: stale {stale}"
