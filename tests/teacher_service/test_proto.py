"""The wire contract's tooling: committed stubs match the proto, `buf lint` is clean,
and `buf breaking` finds no wire/JSON break against the committed descriptor image.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy import ops

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
STUBS = REPO / "teacher_service" / "v1"
IMAGE = "teacher_service_v1.binpb"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        cwd=REPO,
        timeout=120,
    )
    fresh = tmp_path / "teacher_service" / "v1"
    names = ["teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"]
    for name in names:
        assert (fresh / name).is_file(), f"gen_proto.py wrote no {name}"
    _match, mismatch, errors = filecmp.cmpfiles(fresh, STUBS, names, shallow=False)
    assert not mismatch and not errors, (
        f"stale stubs {mismatch or errors}: run `python tools/gen_proto.py` and commit"
    )


def _buf() -> str:
    here = Path(sys.executable).parent / "buf"
    found = str(here) if here.exists() else shutil.which("buf")
    if found is None:
        ops.tool_missing("buf not found: pip install buf-bin (or npm @bufbuild/buf)")
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run(
        [_buf(), "lint"], cwd=PROTO_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_committed_image() -> None:
    assert (PROTO_DIR / IMAGE).is_file(), f"proto/{IMAGE} is missing (buf build -o {IMAGE})"
    result = subprocess.run(
        [_buf(), "breaking", "--against", IMAGE],
        cwd=PROTO_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(tmp_path: Path) -> None:
    """The check can fail: a copy of the proto with a field number changed is refused."""
    buf = _buf()
    copy = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, copy)
    proto = copy / "teacher_service" / "v1" / "teacher.proto"
    text = proto.read_text()
    assert "int32 top_k = 5;" in text
    proto.write_text(text.replace("int32 top_k = 5;", "int32 top_k = 15;"))
    result = subprocess.run(
        [buf, "breaking", "--against", IMAGE],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "top_k" in result.stdout + result.stderr
