"""--pause-when-busy's GPU reading (gpu.other_gpu_use, gpu.GpuBusyMeter) on the fake NVML built from the
H200 recording, by scenario: busy, free, the server's own use, hysteresis, no GPU, NVML errors."""

from __future__ import annotations

from typing import Any

import pynvml

from llmroom_cli import gpu
from llmroom_cli.gpu import GpuBusyMeter, other_gpu_use
from tests import fakes_nvml

GIB = 2**30
SERVER = 1000  # the shared server's pid in these scenarios
NOW_US = 1_800_000_000_000_000


def h200(**device: Any) -> fakes_nvml.FakeNvml:
    nvml = fakes_nvml.one_h200()
    nvml.devices[0].update(device)
    return nvml


def meter(nvml: fakes_nvml.FakeNvml) -> GpuBusyMeter:
    return GpuBusyMeter(lambda: {SERVER}, nvml=nvml, clock_us=lambda: NOW_US)


def test_the_recorded_idle_h200_is_free() -> None:
    nvml = h200()  # as recorded: 0% utilisation, no processes
    reading = meter(nvml).check()
    assert reading.busy is False
    assert reading.use is not None and reading.use.util_percent == 0 and reading.use.memory_bytes == 0
    assert reading.use.util_source == "process"  # NotFound (no samples) is 0%, not "unsupported"


def test_the_servers_own_load_is_not_busy() -> None:
    nvml = h200(
        util={"gpu": 97, "memory": 60},
        compute=[{"pid": SERVER, "used": 40 * GIB}],
        process_util=[{"pid": SERVER, "sm": 97}],
    )
    assert meter(nvml).check().busy is False


def test_another_process_over_the_utilisation_threshold_is_busy() -> None:
    nvml = h200(
        compute=[{"pid": SERVER, "used": 40 * GIB}, {"pid": 4242, "used": 300 * 2**20}],
        process_util=[{"pid": SERVER, "sm": 50}, {"pid": 4242, "sm": gpu.BUSY_UTIL_PERCENT}],
    )
    reading = meter(nvml).check()
    assert reading.busy is True
    assert "20% utilisation" in reading.reason and "pid 4242" in reading.reason


def test_another_process_holding_a_gib_is_busy_even_when_idle() -> None:
    nvml = h200(graphics=[{"pid": 77, "used": gpu.BUSY_MEMORY_BYTES}])  # a game, between frames
    assert meter(nvml).check().busy is True


def test_a_desktop_under_the_thresholds_is_free() -> None:
    nvml = h200(
        graphics=[{"pid": 77, "used": 400 * 2**20}, {"pid": 78, "used": None}],  # Xorg; memory unknown
        process_util=[{"pid": 77, "sm": 3}],
    )
    reading = meter(nvml).check()
    assert reading.busy is False
    assert reading.use is not None and reading.use.pids == [77, 78]


def test_hysteresis_busy_at_once_free_after_two_quiet_readings() -> None:
    nvml = h200(compute=[{"pid": 4242, "used": 2 * GIB}], process_util=[{"pid": 4242, "sm": 50}])
    m = meter(nvml)
    assert m.check().busy is True
    # Between the thresholds (15%, 700 MiB): still busy, however long it stays there.
    nvml.devices[0].update(
        compute=[{"pid": 4242, "used": 700 * 2**20}], process_util=[{"pid": 4242, "sm": 15}]
    )
    assert [m.check().busy for _ in range(3)] == [True, True, True]
    # Under the low thresholds: free only on the second reading in a row.
    nvml.devices[0].update(compute=[], process_util=[])
    assert m.check().busy is True
    assert m.check().busy is False
    # A burst over the high threshold is busy again at once.
    nvml.devices[0].update(process_util=[{"pid": 4242, "sm": 90}])
    assert m.check().busy is True


def test_without_per_process_samples_the_device_figure_counts_only_beside_another_process() -> None:
    alone = h200(
        util={"gpu": 95, "memory": 40}, compute=[{"pid": SERVER, "used": 40 * GIB}], process_util=None
    )
    reading = meter(alone).check()
    assert reading.busy is False  # only the server is on it: its own load is never "busy"
    beside = h200(
        util={"gpu": 95, "memory": 40},
        compute=[{"pid": SERVER, "used": 40 * GIB}, {"pid": 4242, "used": 100 * 2**20}],
        process_util=None,
    )
    reading = meter(beside).check()
    assert reading.busy is True and reading.use is not None and reading.use.util_source == "device"


def test_old_samples_are_not_counted() -> None:
    nvml = h200(process_util=[{"pid": 4242, "sm": 90, "ts": 10}])
    reading = other_gpu_use({SERVER}, _live(nvml), since_us=NOW_US)
    assert reading.util_percent == 0


def test_no_gpu_is_final_and_nvml_is_not_retried() -> None:
    nvml = fakes_nvml.library_missing()
    m = meter(nvml)
    first = m.check()
    assert first.busy is None and first.final and "no NVIDIA GPU to watch" in first.reason
    assert m.check().final and nvml.init_calls == 1


def test_no_device_is_final() -> None:
    nvml = fakes_nvml.FakeNvml(devices=[])
    reading = meter(nvml).check()
    assert reading.busy is None and reading.final and nvml.shutdown_calls == 1


def test_an_nvml_error_is_unknown_not_final_and_keeps_nvml_initialised_once() -> None:
    nvml = h200(compute=[{"pid": 4242, "used": 2 * GIB}])
    m = meter(nvml)
    assert m.check().busy is True
    nvml.failing["nvmlDeviceGetHandleByIndex"] = pynvml.NVMLError_GpuIsLost
    reading = m.check()
    assert reading.busy is None and not reading.final and "GpuIsLost" in reading.reason
    del nvml.failing["nvmlDeviceGetHandleByIndex"]
    assert m.check().busy is True  # and the hysteresis state survived the error
    assert nvml.init_calls == 1  # one init for the whole run, not one per interval
    m.close()
    assert nvml.shutdown_calls == 1


def test_a_process_list_the_driver_does_not_support_is_skipped() -> None:
    nvml = h200(compute=[{"pid": 4242, "used": 2 * GIB}])
    nvml.failing["nvmlDeviceGetGraphicsRunningProcesses"] = pynvml.NVMLError_NotSupported
    assert meter(nvml).check().busy is True


def test_every_gpu_counts() -> None:
    nvml = fakes_nvml.eight_h200()
    nvml.devices[5]["compute"] = [{"pid": 4242, "used": 8 * GIB}]
    reading = meter(nvml).check()
    assert reading.busy is True and reading.use is not None and reading.use.memory_bytes == 8 * GIB


def _live(nvml: fakes_nvml.FakeNvml) -> fakes_nvml.FakeNvml:
    nvml.nvmlInit()
    return nvml
