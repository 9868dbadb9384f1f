"""A fake pynvml by scenario, built from the real H200 recording and raising pynvml's real exceptions.

The recording (tests/fixtures/gpu/nvml-h200.json, copied from the project's shared recordings) is one
H200 read through nvidia-ml-py 13.610 on driver 580.159.04. Scenarios copy that device, change what the
scenario needs (count, model, MIG mode) and keep everything else as recorded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

RECORDING_PATH = Path(__file__).resolve().parent / "fixtures" / "gpu" / "nvml-h200.json"
RECORDING: dict[str, Any] = json.loads(RECORDING_PATH.read_text())
H200: dict[str, Any] = RECORDING["devices"][0]
DRIVER: str = RECORDING["driver"]

# An RTX 4090 as NVML reports it: 24,564 MiB total, compute capability 8.9.
RTX_4090: dict[str, Any] = {
    "name": "NVIDIA GeForce RTX 4090",
    "uuid": "GPU-4090a1b2-0000-1111-2222-333344445555",
    "memory": {"total": 24564 * 2**20, "free": 24000 * 2**20, "used": 564 * 2**20},
    "memory_v2": {
        "total": 24564 * 2**20,
        "reserved": 400 * 2**20,
        "free": 24000 * 2**20,
        "used": 164 * 2**20,
    },
    "cc": [8, 9],
    "mig": [0, 0],
}


@dataclass
class _Handle:
    index: int
    device: dict[str, Any]
    mig_slice: int | None = None  # set on a MIG device handle


@dataclass
class FakeNvml:
    """Quacks like the `pynvml` module for the calls gpu.py makes; counts init / shutdown / MIG calls."""

    devices: list[dict[str, Any]] = field(default_factory=lambda: [copy.deepcopy(H200)])
    driver: str = DRIVER
    init_error: type[pynvml.NVMLError] | None = None
    bytes_strings: bool = False  # nvidia-ml-py < 11.515 returned bytes
    failing: dict[str, type[pynvml.NVMLError]] = field(default_factory=dict)  # call name -> error
    init_calls: int = 0
    shutdown_calls: int = 0
    mig_handle_calls: int = 0
    _live: bool = False

    # -- life cycle --
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()
        self._live = True

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.shutdown_calls += 1
        self._live = False

    # -- system --
    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._check("nvmlSystemGetDriverVersion")
        return self._str(self.driver)

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.devices)  # physical devices only, as the real NVML: MIG devices are not counted

    # -- devices --
    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError_InvalidArgument()
        return _Handle(index, self.devices[index])

    def nvmlDeviceGetName(self, handle: _Handle) -> str | bytes:
        self._check("nvmlDeviceGetName")
        return self._str(handle.device["name"])

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str | bytes:
        self._check("nvmlDeviceGetUUID")
        return self._str(handle.device["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> SimpleNamespace:
        self._check("nvmlDeviceGetMemoryInfo")
        if handle.mig_slice is not None:
            total = handle.device["memory"]["total"] // 7
            return SimpleNamespace(total=total, free=total, used=0)
        if version:
            return SimpleNamespace(**handle.device["memory_v2"])
        return SimpleNamespace(**handle.device["memory"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        self._check("nvmlDeviceGetCudaComputeCapability")
        major, minor = handle.device["cc"]
        return (major, minor)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        self._check("nvmlDeviceGetMigMode")
        return list(handle.device["mig"])

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMaxMigDeviceCount")
        return 7 if handle.device["mig"][0] else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        self._check("nvmlDeviceGetMigDeviceHandleByIndex")
        self.mig_handle_calls += 1
        if not handle.device["mig"][0]:
            raise pynvml.NVMLError_NotFound()
        return _Handle(handle.index, handle.device, mig_slice=index)

    # -- processes and utilisation (--pause-when-busy) --
    # Per device: "compute" / "graphics": [{"pid", "used"}] (used None: the driver cannot say);
    # "util": {"gpu", "memory"} as recorded (0/0 on the idle H200); "process_util": [{"pid", "sm",
    # "ts"}], or None where the driver has no per-process samples (NotSupported).
    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return _procs(handle.device.get("compute", []))

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetGraphicsRunningProcesses")
        return _procs(handle.device.get("graphics", []))

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        self._check("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(**handle.device["util"])

    def nvmlDeviceGetProcessUtilization(self, handle: _Handle, timeStamp: int) -> list[SimpleNamespace]:
        self._check("nvmlDeviceGetProcessUtilization")
        samples = handle.device.get("process_util", [])
        if samples is None:
            raise pynvml.NVMLError_NotSupported()
        recent = [
            SimpleNamespace(pid=s["pid"], smUtil=s["sm"], memUtil=0, timeStamp=s.get("ts", timeStamp + 1))
            for s in samples
            if s.get("ts", timeStamp + 1) > timeStamp
        ]
        if not recent:
            raise pynvml.NVMLError_NotFound()  # what the real call does with no sample in the window
        return recent

    # -- helpers --
    def _check(self, call: str) -> None:
        if not self._live:
            raise pynvml.NVMLError_Uninitialized()
        error = self.failing.get(call)
        if error is not None:
            raise error()

    def _str(self, text: str) -> str | bytes:
        return text.encode() if self.bytes_strings else text


def _procs(entries: list[dict[str, Any]]) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=e["pid"], usedGpuMemory=e.get("used")) for e in entries]


def _h200(index: int) -> dict[str, Any]:
    device = copy.deepcopy(H200)
    device["index"] = index
    device["uuid"] = H200["uuid"][:-2] + f"{index:02x}"
    return device


def one_h200(**kw: Any) -> FakeNvml:
    return FakeNvml(devices=[_h200(0)], **kw)


def eight_h200() -> FakeNvml:
    return FakeNvml(devices=[_h200(i) for i in range(8)])


def mixed() -> FakeNvml:
    """2x H200 + one RTX 4090 (a mixed box: "2x NVIDIA H200 + NVIDIA GeForce RTX 4090")."""
    return FakeNvml(devices=[_h200(0), copy.deepcopy(RTX_4090), _h200(1)])


def mig_on() -> FakeNvml:
    """The H200 with MIG enabled (7 instances): still one physical device with its full memory."""
    device = _h200(0)
    device["mig"] = [1, 1]
    return FakeNvml(devices=[device])


def library_missing() -> FakeNvml:
    return FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound)


def driver_not_loaded() -> FakeNvml:
    return FakeNvml(init_error=pynvml.NVMLError_DriverNotLoaded)
