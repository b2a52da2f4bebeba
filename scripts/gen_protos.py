"""Compile proto/ into the pdserve_pb package: python scripts/gen_protos.py [OUT_ROOT].

The sources live under proto/pdserve_pb/ so that the generated modules import
each other as ``pdserve_pb.v1...`` (a path of ``pdserve/`` would collide with
the pdserve package). The generated modules are committed; tests/test_protos.py
regenerates them into a temporary folder and fails when the committed ones are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(s.relative_to(PROTO_ROOT)) for s in sources]) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "pdserve_pb"
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return sorted(p.relative_to(out_dir) for p in package.rglob("*.py"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
