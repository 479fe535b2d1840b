"""GPU memory as the device sees it, through NVML (package nvidia-ml-py, module pynvml).

The teacher's memory gauges must count what the *engine* holds: the vLLM backend
allocates in its engine-core and worker processes, so `torch.cuda.memory_allocated` in
the API process reads ~0. NVML reports each device's used and total memory whoever
allocated it (every process on the GPU; a teacher pod owns its GPUs).

    reader = NvmlReader.for_this_process()
    reader.read()   # [DeviceMemory("cuda:0", used, total), ...]; [] without a GPU

Devices are the ones this process may use, named as CUDA names them: with
`CUDA_VISIBLE_DEVICES=2,3` physical GPU 2 is "cuda:0". Without NVML (no package, no
driver, no GPU) `read()` returns [] and the gauges stay absent rather than reading 0.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One visible device: its CUDA name and NVML's used / total bytes."""

    name: str
    used_bytes: int
    total_bytes: int


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES as a list of NVML indices (int) or UUIDs (str).

    None (unset) means every device; "" or a leading "-1" means none (CUDA stops at the
    first invalid entry, so does this).
    """
    if value is None:
        return None
    devices: list[int | str] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit():
            devices.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            devices.append(entry)
        else:
            break
    return devices


class NvmlReader:
    """Reads device memory through NVML; initialises NVML lazily, once.

    Args:
        visible: NVML indices or UUIDs in CUDA order (see `parse_visible_devices`);
            None means every device. `NvmlReader.for_this_process()` takes this
            process's CUDA_VISIBLE_DEVICES.
    """

    def __init__(self, visible: list[int | str] | None = None) -> None:
        self._visible = visible
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] | None = None  # None: not initialised yet
        self._lock = threading.Lock()  # scrapes may overlap

    @classmethod
    def for_this_process(cls) -> NvmlReader:
        # CUDA's own variable, read where devices are enumerated (as torch and vLLM do).
        return cls(parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")))

    def _init(self) -> list[tuple[str, Any]]:
        try:
            import pynvml
        except ImportError:
            log.info("nvidia-ml-py not installed: no GPU memory gauges")
            return []
        try:
            pynvml.nvmlInit()
            wanted = self._visible
            if wanted is None:
                wanted = list(range(pynvml.nvmlDeviceGetCount()))
            handles = []
            for ordinal, device in enumerate(wanted):
                if isinstance(device, int):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(device)
                handles.append((f"cuda:{ordinal}", handle))
        except pynvml.NVMLError as exc:
            log.info("NVML unavailable (%s): no GPU memory gauges", exc)
            return []
        self._nvml = pynvml
        return handles

    def read(self) -> list[DeviceMemory]:
        """Used and total bytes of every visible device; [] without NVML or GPUs."""
        with self._lock:
            if self._handles is None:
                self._handles = self._init()
            out = []
            for name, handle in self._handles:
                try:
                    info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                except self._nvml.NVMLError as exc:  # a GPU that fell off the bus
                    log.warning("NVML cannot read %s: %s", name, exc)
                    continue
                out.append(DeviceMemory(name, int(info.used), int(info.total)))
            return out
