"""gpu.py by scenario: fake NVML (real exception classes), nvidia-smi, sysfs, Apple and Windows readers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pynvml
import pytest

from llmroom_cli.gpu import (
    DISPLAY_CLASS,
    GpuInfo,
    apple_gpu_budget_bytes,
    detect_gpus,
    lookup_pci_ids,
    parse_nvidia_smi,
    summarize,
    total_vram_gb,
)
from tests import fakes_nvml

GIB = 2**30
SMI_4090 = "NVIDIA GeForce RTX 4090, 24564\nNVIDIA GeForce RTX 4090, 24564\n"


def nvidia_root(tmp_path: Path) -> Path:
    """A / whose /proc shows the NVIDIA kernel driver (NVML is only tried then, on Linux)."""
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    return tmp_path


class Log(list[str]):
    def __call__(self, text: str) -> None:
        self.append(text)


def no_which(name: str) -> str | None:
    return None


def smi_which(name: str) -> str | None:
    return "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None


def fixed_run(stdout: str) -> Any:
    calls: list[list[str]] = []

    def run(argv: Sequence[str], timeout_s: float) -> str:
        calls.append(list(argv))
        return stdout

    run.calls = calls  # type: ignore[attr-defined]
    return run


def linux(tmp_path: Path, nvml: Any, **kw: Any) -> list[GpuInfo]:
    kw.setdefault("which", no_which)
    return detect_gpus(kw.pop("debug", None), system="Linux", root=nvidia_root(tmp_path), nvml=nvml, **kw)


# -- NVML -------------------------------------------------------------------------------------------------


def test_one_h200_as_recorded(tmp_path: Path) -> None:
    nvml = fakes_nvml.one_h200()
    gpus = linux(tmp_path, nvml)
    assert gpus == [
        GpuInfo(
            "NVIDIA H200",
            150_754_820_096,
            "NVIDIA",
            driver="580.159.04",
            uuid=fakes_nvml.H200["uuid"][:-2] + "00",
            compute_capability="9.0",
            source="NVML",
        )
    ]
    assert gpus[0].vram_gb == 140
    assert summarize(gpus) == "NVIDIA H200"
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_bytes_from_old_bindings_are_decoded(tmp_path: Path) -> None:
    gpus = linux(tmp_path, fakes_nvml.one_h200(bytes_strings=True))
    assert gpus[0].name == "NVIDIA H200"
    assert gpus[0].driver == "580.159.04"
    assert gpus[0].uuid is not None and gpus[0].uuid.startswith("GPU-")


def test_eight_h200(tmp_path: Path) -> None:
    gpus = linux(tmp_path, fakes_nvml.eight_h200())
    assert summarize(gpus) == "8x NVIDIA H200"
    assert total_vram_gb(gpus) == 1120
    assert len({g.uuid for g in gpus}) == 8


def test_mixed_models(tmp_path: Path) -> None:
    gpus = linux(tmp_path, fakes_nvml.mixed())
    assert summarize(gpus) == "2x NVIDIA H200 + NVIDIA GeForce RTX 4090"
    assert total_vram_gb(gpus) == 140 + 24 + 140
    assert [g.compute_capability for g in gpus] == ["9.0", "8.9", "9.0"]


def test_mig_enabled_gpu_counts_once_with_full_memory(tmp_path: Path) -> None:
    nvml = fakes_nvml.mig_on()
    log = Log()
    gpus = linux(tmp_path, nvml, debug=log)
    assert summarize(gpus) == "NVIDIA H200"
    assert total_vram_gb(gpus) == 140
    assert nvml.mig_handle_calls == 0  # MIG instances are never enumerated
    assert any("MIG enabled" in line for line in log)


def test_library_missing_falls_back_to_nvidia_smi(tmp_path: Path) -> None:
    nvml = fakes_nvml.library_missing()
    run = fixed_run(SMI_4090)
    log = Log()
    gpus = linux(tmp_path, nvml, run=run, which=smi_which, debug=log)
    assert summarize(gpus) == "2x NVIDIA GeForce RTX 4090"
    assert total_vram_gb(gpus) == 48
    assert {g.source for g in gpus} == {"nvidia-smi"}
    argv = run.calls[0]
    assert argv[0] == "/usr/bin/nvidia-smi"
    assert "--format=csv,noheader,nounits" in argv
    assert any(a.startswith("--query-gpu=name,memory.total") for a in argv)
    assert nvml.shutdown_calls == 0  # init failed: nothing to shut down
    assert any("NVMLError_LibraryNotFound" in line for line in log)


def test_driver_not_loaded_and_no_nvidia_smi_means_no_gpu(tmp_path: Path) -> None:
    log = Log()
    assert linux(tmp_path, fakes_nvml.driver_not_loaded(), debug=log) == []
    assert any("NVMLError_DriverNotLoaded" in line for line in log)
    assert any("nvidia-smi: not found" in line for line in log)


def test_nvidia_smi_absent(tmp_path: Path) -> None:
    run = fixed_run(SMI_4090)
    assert linux(tmp_path, fakes_nvml.library_missing(), run=run, which=no_which) == []
    assert run.calls == []


def test_nvidia_smi_failing_exit_means_no_gpu(tmp_path: Path) -> None:
    def run(argv: Sequence[str], timeout_s: float) -> str:
        raise subprocess.CalledProcessError(9, list(argv), "", "NVIDIA-SMI has failed")

    assert linux(tmp_path, fakes_nvml.library_missing(), run=run, which=smi_which) == []


def test_nvidia_smi_hanging_returns_quickly(tmp_path: Path) -> None:
    """A real process that never answers: the default runner kills it at the timeout."""
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = Log()
    started = time.monotonic()
    gpus = detect_gpus(
        log,
        system="Linux",
        root=nvidia_root(tmp_path),
        nvml=fakes_nvml.library_missing(),
        which=lambda name: str(script),
        smi_timeout_s=0.3,
    )
    assert gpus == []
    assert time.monotonic() - started < 5
    assert any("no answer within 0.3 s" in line for line in log)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell script")
def test_nvidia_smi_real_process_output_is_parsed(tmp_path: Path) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771, 580.159.04, GPU-0c8ca6f4'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    gpus = linux(tmp_path, fakes_nvml.library_missing(), which=lambda name: str(script))
    assert [(g.name, g.vram_gb, g.driver, g.uuid) for g in gpus] == [
        ("NVIDIA H200", 140, "580.159.04", "GPU-0c8ca6f4")
    ]


def test_parse_nvidia_smi_tolerates_na_and_blank_lines() -> None:
    out = "NVIDIA GB10, [N/A], 580.95.05, GPU-1\n\nNVIDIA H200, 143771, [N/A], [N/A]\n"
    gpus = parse_nvidia_smi(out)
    assert [(g.name, g.vram_bytes, g.driver, g.uuid) for g in gpus] == [
        ("NVIDIA GB10", None, "580.95.05", "GPU-1"),
        ("NVIDIA H200", 143771 * 2**20, None, None),
    ]
    assert total_vram_gb(gpus) is None  # one size unknown: no misleading partial sum


def test_a_failing_metric_drops_only_that_field(tmp_path: Path) -> None:
    nvml = fakes_nvml.one_h200(
        failing={
            "nvmlDeviceGetMemoryInfo": pynvml.NVMLError_NotSupported,
            "nvmlDeviceGetCudaComputeCapability": pynvml.NVMLError_FunctionNotFound,
            "nvmlSystemGetDriverVersion": pynvml.NVMLError_Unknown,
        }
    )
    [gpu] = linux(tmp_path, nvml)
    assert (gpu.name, gpu.vram_bytes, gpu.driver, gpu.compute_capability) == ("NVIDIA H200", None, None, None)
    assert gpu.to_dict() == {"name": "NVIDIA H200", "vendor": "NVIDIA", "uuid": gpu.uuid}
    assert nvml.shutdown_calls == 1


def test_a_lost_gpu_is_skipped_and_the_rest_reported(tmp_path: Path) -> None:
    nvml = fakes_nvml.eight_h200()
    real = nvml.nvmlDeviceGetHandleByIndex

    def flaky(index: int) -> Any:
        if index == 3:
            raise pynvml.NVMLError_GpuIsLost()
        return real(index)

    nvml.nvmlDeviceGetHandleByIndex = flaky  # type: ignore[method-assign]
    assert summarize(linux(tmp_path, nvml)) == "7x NVIDIA H200"


def test_count_failing_after_init_falls_back_and_still_shuts_down(tmp_path: Path) -> None:
    nvml = fakes_nvml.one_h200(failing={"nvmlDeviceGetCount": pynvml.NVMLError_Unknown})
    gpus = linux(tmp_path, nvml, run=fixed_run(SMI_4090), which=smi_which)
    assert summarize(gpus) == "2x NVIDIA GeForce RTX 4090"
    assert nvml.shutdown_calls == 1


def test_no_nvidia_driver_on_linux_skips_nvml_entirely(tmp_path: Path) -> None:
    nvml = fakes_nvml.one_h200()
    run = fixed_run(SMI_4090)
    assert detect_gpus(system="Linux", root=tmp_path, nvml=nvml, run=run, which=smi_which) == []
    assert nvml.init_calls == 0 and run.calls == []


def test_a_broken_binding_never_raises(tmp_path: Path) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(name)

    def bad_debug(text: str) -> None:
        raise ValueError("a broken logger")

    assert detect_gpus(bad_debug, system="Linux", root=nvidia_root(tmp_path), nvml=Broken()) == []
    assert detect_gpus(system="Linux", root=tmp_path / "missing", nvml=Broken()) == []


def test_import_does_not_initialise_nvml() -> None:
    code = (
        "import sys, llmroom_cli.gpu, llmroom_cli.specs\n"
        "bad = [m for m in ('pynvml', 'psutil', 'subprocess', 'platform') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr


# -- AMD / Intel sysfs ------------------------------------------------------------------------------------

PCI_IDS = """\
# a trimmed pci.ids
1002  Advanced Micro Devices, Inc. [AMD/ATI]
\t15bf  Phoenix1
\t744c  Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]
\t\t1002 0e3b  Radeon RX 7900 XTX
\t\t1da2 e471  NITRO+ RX 7900 XTX Vapor-X
\t74a1  Aqua Vanjaram [Instinct MI300X]
1014  IBM
8086  Intel Corporation
\t56a0  DG2 [Arc A770]
\t7d55  Meteor Lake-P [Intel Arc Graphics]
\te20b  Battlemage G21 [Arc B580]
"""


def card(
    root: Path,
    n: int,
    vendor: str,
    device: str,
    slot: str,
    files: dict[str, str],
    sub: tuple[str, str] = ("", ""),
) -> Path:
    dev = root / f"sys/devices/pci0000:00/{slot}"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(f"0x{vendor}\n")
    (dev / "device").write_text(f"0x{device}\n")
    (dev / "uevent").write_text(f"DRIVER=x\nPCI_SLOT_NAME={slot}\n")
    if sub[0]:
        (dev / "subsystem_vendor").write_text(f"0x{sub[0]}\n")
        (dev / "subsystem_device").write_text(f"0x{sub[1]}\n")
    for rel, text in files.items():
        (dev / rel).parent.mkdir(parents=True, exist_ok=True)
        (dev / rel).write_text(text)
    drm = root / "sys/class/drm" / f"card{n}"
    drm.mkdir(parents=True)
    (drm / "device").symlink_to(dev)
    (root / "sys/class/drm" / f"card{n}-DP-1").mkdir()  # a connector, not a card
    return dev


def pci_ids(root: Path, where: str = "usr/share/hwdata/pci.ids") -> None:
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).write_text(PCI_IDS)


def sysfs(root: Path, **kw: Any) -> list[GpuInfo]:
    kw.setdefault("which", no_which)
    return detect_gpus(kw.pop("debug", None), system="Linux", root=root, nvml=fakes_nvml.one_h200(), **kw)


def test_amd_sysfs_reference_board_and_apu_carve_out(tmp_path: Path) -> None:
    pci_ids(tmp_path)
    card(tmp_path, 0, "1002", "15bf", "0000:c5:00.0", {"mem_info_vram_total": str(512 * 2**20)})  # APU
    vram = str(24 * GIB - 4 * 2**20)
    card(tmp_path, 1, "1002", "744c", "0000:03:00.0", {"mem_info_vram_total": vram}, ("1002", "0e3b"))
    log = Log()
    gpus = sysfs(tmp_path, debug=log)
    assert [(g.name, g.vram_gb, g.vendor, g.source) for g in gpus] == [
        ("AMD Radeon RX 7900 XTX", 24, "AMD", "sysfs")
    ]
    assert any("APU carve-out" in line for line in log)


def test_amd_partner_board_uses_the_device_name(tmp_path: Path) -> None:
    pci_ids(tmp_path, "usr/share/misc/pci.ids")
    card(
        tmp_path, 0, "1002", "744c", "0000:03:00.0", {"mem_info_vram_total": str(20 * GIB)}, ("1da2", "e471")
    )
    card(tmp_path, 1, "1002", "74a1", "0000:04:00.0", {"mem_info_vram_total": str(192 * GIB)})
    assert summarize(sysfs(tmp_path)) == "AMD Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M + AMD Instinct MI300X"


def test_amd_without_pci_ids_asks_rocm_smi_then_falls_back_to_ids(tmp_path: Path) -> None:
    card(tmp_path, 0, "1002", "744c", "0000:03:00.0", {"mem_info_vram_total": str(24 * GIB)})
    run = fixed_run("GPU[0]\t\t: Card Series: \t\tRadeon RX 7900 XTX\n")
    gpus = sysfs(tmp_path, run=run, which=lambda n: "/opt/rocm/bin/rocm-smi" if n == "rocm-smi" else None)
    assert gpus[0].name == "AMD Radeon RX 7900 XTX"
    assert run.calls == [["/opt/rocm/bin/rocm-smi", "--showproductname"]]
    assert sysfs(tmp_path)[0].name == "AMD GPU [1002:744c]"


def test_amd_product_name_file_wins(tmp_path: Path) -> None:
    files = {"mem_info_vram_total": str(48 * GIB), "product_name": "AMD Radeon PRO W7900\n"}
    card(tmp_path, 0, "1002", "7448", "0000:03:00.0", files)
    assert summarize(sysfs(tmp_path)) == "AMD Radeon PRO W7900"


def test_intel_xe_tiles_and_integrated_gpu(tmp_path: Path) -> None:
    pci_ids(tmp_path)
    card(tmp_path, 0, "8086", "7d55", "0000:00:02.0", {})  # integrated: left out
    card(tmp_path, 1, "8086", "e20b", "0000:03:00.0", {"tile0/physical_vram_size_bytes": str(12 * GIB)})
    gpus = sysfs(tmp_path)
    assert [(g.name, g.vram_gb, g.vendor) for g in gpus] == [("Intel Arc B580", 12, "Intel")]


def test_intel_i915_lmem(tmp_path: Path) -> None:
    pci_ids(tmp_path)
    card(tmp_path, 0, "8086", "56a0", "0000:03:00.0", {})
    (tmp_path / "sys/class/drm/card0/lmem_total_bytes").write_text(str(16 * GIB))
    assert [(g.name, g.vram_gb) for g in sysfs(tmp_path)] == [("Intel Arc A770", 16)]


def test_intel_discrete_without_memory_file_is_still_listed(tmp_path: Path) -> None:
    card(tmp_path, 0, "8086", "56a0", "0000:03:00.0", {})
    [gpu] = sysfs(tmp_path)
    assert (gpu.name, gpu.vram_bytes) == ("Intel GPU [8086:56a0]", None)


def test_nvidia_and_amd_together(tmp_path: Path) -> None:
    pci_ids(tmp_path)
    card(
        tmp_path, 0, "1002", "744c", "0000:03:00.0", {"mem_info_vram_total": str(24 * GIB)}, ("1002", "0e3b")
    )
    gpus = linux(tmp_path, fakes_nvml.one_h200())
    assert summarize(gpus) == "NVIDIA H200 + AMD Radeon RX 7900 XTX"
    assert total_vram_gb(gpus) == 164


def test_lookup_pci_ids_stops_at_the_next_vendor() -> None:
    assert lookup_pci_ids(PCI_IDS, "1002", "56a0") is None
    assert lookup_pci_ids(PCI_IDS, "8086", "56a0") == "DG2 [Arc A770]"
    assert lookup_pci_ids(PCI_IDS, "1002", "744c", ("1002", "0e3b")) == "Radeon RX 7900 XTX"
    assert lookup_pci_ids(PCI_IDS, "abcd", "0001") is None


# -- Apple ------------------------------------------------------------------------------------------------


def sysctl_of(values: dict[str, str]) -> Callable[[Sequence[str]], dict[str, str]]:
    def read(names: Sequence[str]) -> dict[str, str]:
        return {n: values[n] for n in names if n in values}

    return read


@pytest.mark.parametrize(
    ("ram_gb", "wired_mb", "vram_gb"),
    [
        (8, "0", 5),
        (16, "0", 11),
        (32, "0", 21),
        (36, "0", 24),
        (64, "0", 48),
        (192, "0", 144),
        (64, "57344", 56),
    ],
)
def test_apple_silicon_gpu_budget(ram_gb: int, wired_mb: str, vram_gb: int) -> None:
    values = {"machdep.cpu.brand_string": "Apple M2 Max", "hw.memsize": str(ram_gb * GIB)}
    values["iogpu.wired_limit_mb"] = wired_mb
    [gpu] = detect_gpus(system="Darwin", sysctl=sysctl_of(values))
    assert (gpu.name, gpu.vendor, gpu.vram_gb) == ("Apple M2 Max", "Apple", vram_gb)


def test_apple_before_macos_14_has_no_wired_limit() -> None:
    values = {"machdep.cpu.brand_string": "Apple M1", "hw.memsize": str(16 * GIB)}
    assert detect_gpus(system="Darwin", sysctl=sysctl_of(values))[0].vram_gb == 11
    assert apple_gpu_budget_bytes(16 * GIB, None) == apple_gpu_budget_bytes(16 * GIB, 0)


def test_intel_mac_reports_no_gpu() -> None:
    values = {"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", "hw.memsize": str(GIB)}
    assert detect_gpus(system="Darwin", sysctl=sysctl_of(values)) == []


# -- Windows ----------------------------------------------------------------------------------------------


class FakeRegistry:
    def __init__(self, keys: dict[str, dict[str, Any]]) -> None:
        self.keys = keys

    def value(self, path: str, name: str) -> Any:
        return self.keys.get(path, {}).get(name)

    def subkeys(self, path: str) -> list[str]:
        prefix = path + "\\"
        return sorted({k[len(prefix) :].split("\\")[0] for k in self.keys if k.startswith(prefix)})


def display_adapters() -> FakeRegistry:
    c = DISPLAY_CLASS + "\\"
    return FakeRegistry(
        {
            c + "0000": {
                "DriverDesc": "NVIDIA GeForce RTX 4090",
                "MatchingDeviceId": "PCI\\VEN_10DE&DEV_2684",
                "HardwareInformation.qwMemorySize": 24564 * 2**20,
                "DriverVersion": "32.0.15.6094",
            },
            c + "0001": {
                "DriverDesc": "AMD Radeon RX 7900 XTX",
                "MatchingDeviceId": "pci\\ven_1002&dev_744c",
                "HardwareInformation.qwMemorySize": 24 * GIB,
            },
            c + "0002": {
                "DriverDesc": "Intel(R) UHD Graphics 770",
                "MatchingDeviceId": "pci\\ven_8086&dev_4680",
                "HardwareInformation.MemorySize": (128 * 2**20).to_bytes(4, "little"),
            },
            c + "0003": {
                "DriverDesc": "Microsoft Basic Display Adapter",
                "MatchingDeviceId": "root\\basicdisplay",
            },
            c + "Properties": {},
        }
    )


def test_windows_registry_without_nvml() -> None:
    gpus = detect_gpus(
        system="Windows", nvml=fakes_nvml.library_missing(), which=no_which, registry=display_adapters()
    )
    assert summarize(gpus) == "NVIDIA GeForce RTX 4090 + AMD Radeon RX 7900 XTX"
    assert total_vram_gb(gpus) == 48
    assert gpus[0].driver == "32.0.15.6094"


def test_windows_nvml_wins_over_the_registry_for_nvidia() -> None:
    gpus = detect_gpus(system="Windows", nvml=fakes_nvml.one_h200(), registry=display_adapters())
    assert summarize(gpus) == "NVIDIA H200 + AMD Radeon RX 7900 XTX"
    assert gpus[0].source == "NVML"


def test_windows_registry_failure_is_contained() -> None:
    class Boom:
        def value(self, path: str, name: str) -> Any:
            raise OSError("denied")

        def subkeys(self, path: str) -> list[str]:
            raise OSError("denied")

    assert (
        detect_gpus(system="Windows", nvml=fakes_nvml.driver_not_loaded(), which=no_which, registry=Boom())
        == []
    )


def test_default_registry_is_inert_off_windows() -> None:
    if os.name == "nt":
        pytest.skip("reads the real registry")
    from llmroom_cli.gpu import WinRegistry

    assert WinRegistry().value(DISPLAY_CLASS, "x") is None
    assert WinRegistry().subkeys(DISPLAY_CLASS) == []
