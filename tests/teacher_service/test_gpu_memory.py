"""GPU memory gauges through NVML: device-wide, so memory a vLLM engine holds in its own
processes counts; absent (not 0) without a GPU or without NVML.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from teacher_service.gpu_memory import NvmlReader, parse_visible_devices
from teacher_service.metrics import Metrics
from teacher_service.server import sample_gpu_memory


def test_visible_devices_follow_cuda_rules() -> None:
    assert parse_visible_devices(None) is None  # unset: every device
    assert parse_visible_devices("") == []
    assert parse_visible_devices("2, 0") == [2, 0]
    uuid = "GPU-8f0c2a8e-1b2c-4d5e-9f00-0123456789ab"
    assert parse_visible_devices(f"{uuid},1") == [uuid, 1]
    assert parse_visible_devices("1,-1,2") == [1]  # CUDA stops at the first invalid entry
    assert parse_visible_devices("-1") == []


def test_without_nvml_the_reader_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """No package (import fails) and, on this CPU machine, no driver library: both read
    as no devices, and the gauges stay absent."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert NvmlReader().read() == []
    monkeypatch.undo()
    metrics = Metrics()
    reader = NvmlReader.for_this_process()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_gpu_memory_counts_other_processes covers it")
    assert reader.read() == []
    sample_gpu_memory(metrics, reader)
    for gauge in (metrics.gpu_memory_used, metrics.gpu_memory_total):
        assert not list(gauge.collect()[0].samples)


def test_no_visible_device_reads_nothing_even_with_a_gpu() -> None:
    assert NvmlReader(parse_visible_devices("")).read() == []


_HOLD = """
import sys, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_counts_other_processes() -> None:
    """Memory another process allocates (as vLLM's engine does) shows in the gauge."""
    reader = NvmlReader.for_this_process()
    (first, *_) = reader.read()
    assert first.name == "cuda:0" and 0 < first.used_bytes <= first.total_bytes
    size = 1 << 30
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        held = reader.read()[0]
        # 1 GiB plus the child's CUDA context; other tenants may move a little.
        assert held.used_bytes - first.used_bytes >= size * 0.9, (first, held)
        metrics = Metrics()
        sample_gpu_memory(metrics, reader)
        used = metrics.gpu_memory_used.labels("cuda:0")._value.get()
        assert used >= held.used_bytes * 0.9
        assert metrics.gpu_memory_total.labels("cuda:0")._value.get() == first.total_bytes
    finally:
        child.communicate("", timeout=60)
    deadline = time.monotonic() + 30
    while reader.read()[0].used_bytes - first.used_bytes > size / 2:
        assert time.monotonic() < deadline, "child's memory never returned"
        time.sleep(0.2)
