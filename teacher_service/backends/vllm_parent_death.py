"""Make vLLM's engine-core process die with the server (Linux: PR_SET_PDEATHSIG).

vLLM runs its engine in a child process (EngineCore), which on CPU and with tensor
parallelism starts worker processes of its own. Workers watch EngineCore through a
pipe and exit when it goes, but EngineCore does not watch the API process: a server
killed with SIGKILL (OOM killer, `kill -9`) left EngineCore and its workers running
for good, holding the model's memory.

`install()` swaps the target vLLM spawns EngineCore with (`EngineCoreProc.run_engine_core`)
for `run_engine_core_tied_to_parent`, a module-level function (spawned children pickle
their target by name, so it must be importable) that asks the kernel to SIGKILL the
process when its parent dies, then runs vLLM's own function. Caveat from prctl(2): the
"parent" is the *thread* that started the child, so the backend builds the engine on
a thread that lives until the engine is shut down.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> bool:
    """Asks Linux to SIGKILL this process when its parent thread exits; True if set.

    If the parent is already gone (it died before this ran) the process exits now.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl: too late for the signal
        os._exit(1)
    return True


def run_engine_core_tied_to_parent(*args: Any, **kwargs: Any) -> Any:
    """vLLM's EngineCoreProc.run_engine_core, in a process that dies with its parent."""
    from vllm.v1.engine.core import EngineCoreProc

    parent = int(os.environ.get("HYBRID_DISTILL_ENGINE_PARENT", "0"))
    die_with_parent(parent or os.getppid())
    original = EngineCoreProc.__dict__["run_engine_core"]
    function = getattr(original, "__func__", original)
    if function is run_engine_core_tied_to_parent:  # patched in this process as well
        function = _ORIGINAL[0]
    return function(*args, **kwargs)


_ORIGINAL: list[Any] = []


def install() -> bool:
    """Routes vLLM's EngineCore start through `run_engine_core_tied_to_parent`.

    Returns False (and changes nothing) when this vLLM has no such entry point.
    Idempotent.
    """
    try:
        from vllm.v1.engine.core import EngineCoreProc
    except ImportError:
        return False
    current = EngineCoreProc.__dict__.get("run_engine_core")
    if current is None:
        log.warning("vLLM has no EngineCoreProc.run_engine_core: engine may outlive the server")
        return False
    function = getattr(current, "__func__", current)
    if function is not run_engine_core_tied_to_parent:
        _ORIGINAL[:] = [function]
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core_tied_to_parent)
    # Read by the child (spawned: a fresh interpreter with this environment).
    os.environ["HYBRID_DISTILL_ENGINE_PARENT"] = str(os.getpid())
    return True
