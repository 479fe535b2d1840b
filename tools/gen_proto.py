"""Regenerates the committed gRPC/protobuf stubs in teacher_service/v1/ from proto/.

Run from the repository root:  python tools/gen_proto.py [--out DIR]

The stubs are committed so that users need no protoc; tests/teacher_service/test_proto.py
regenerates them into a temporary folder and diffs them against the committed ones.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "teacher_service/v1/teacher.proto"


def generate(out_dir: Path) -> None:
    """Writes teacher_pb2.py, teacher_pb2.pyi and teacher_pb2_grpc.py under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
