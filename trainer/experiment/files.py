"""Parallel-safe, resumable files for the experiment grid: atomic writes and run locks.

A result is written to a temporary name in the same directory and renamed into place
(rename is atomic on POSIX), so a reader sees the whole file or none. A run (or a shared
artefact such as a task's teacher) is claimed with a lock file created with O_EXCL that
holds the owner's pid and host; a lock whose owner process is gone is stale and is taken
over, so a killed grid resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULT = "result.json"  # a run's record; its presence marks the run done
ARCHIVED = RESULT + ".gz"  # the same record in a committed archive (archive.py)


def write_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` to `path` via a temporary file and a rename."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def write_json(path: str | Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _owner_alive(lock: Path) -> bool:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return True  # being written right now: treat as held
    if owner.get("host") != socket.gethostname():
        return True  # another machine's lock: never steal it
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_lock(lock: str | Path) -> bool:
    """Claims `lock` for this process; False when a live process holds it."""
    path = Path(lock)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _owner_alive(path):
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its owner died
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "t": time.time()}, f)
        return True
    return False


def unlock(lock: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(lock).unlink()


@contextlib.contextmanager
def locked(lock: str | Path, poll_s: float = 1.0) -> Iterator[None]:
    """Waits for `lock`, holds it for the block (for shared artefacts built once)."""
    while not try_lock(lock):
        time.sleep(poll_s)
    try:
        yield
    finally:
        unlock(lock)
