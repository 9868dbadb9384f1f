"""specs.py: the `specs` object `join` sends, from fake /proc + /sys trees, macOS and Windows readers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmroom_cli.errors import UsageError
from llmroom_cli.gpu import DISPLAY_CLASS
from llmroom_cli.specs import (
    CPU_KEY,
    SHARE_FIELDS,
    WINDOWS_KEY,
    MachineSpecs,
    detect_specs,
    linux_cpu_name,
    parse_share,
    round_up_ram_gb,
    select,
)
from tests import fakes_nvml
from tests.test_gpu import FakeRegistry, Log, display_adapters, no_which, nvidia_root, sysctl_of

GIB = 2**30
X86_CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    f"physical id\t: 0\nsiblings\t: 4\ncore id\t\t: {i // 2}\ncpu cores\t: 2\n\n"
    for i in range(4)
)
MEMINFO_24 = "MemTotal:       24684092 kB\nMemFree:        24250632 kB\n"


def assert_no_unknowns(value: Any, path: str = "specs") -> None:
    """No null, 0, empty or "Unknown" anywhere: an unknown key is absent."""
    assert value is not None, path
    if isinstance(value, dict):
        assert value, path
        for k, v in value.items():
            assert_no_unknowns(v, f"{path}.{k}")
    elif isinstance(value, list):
        assert value, path
        for i, v in enumerate(value):
            assert_no_unknowns(v, f"{path}[{i}]")
    elif isinstance(value, bool):
        assert value is True, path
    elif isinstance(value, (int, float)):
        assert value > 0, path
    else:
        assert isinstance(value, str) and value.strip(), path
        assert value.strip().lower() not in ("unknown", "n/a", "none"), path


def linux_tree(
    root: Path, cpuinfo: str = X86_CPUINFO, meminfo: str = MEMINFO_24, blocks: int | None = 192
) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/cpuinfo").write_text(cpuinfo)
    (root / "proc/meminfo").write_text(meminfo)
    if blocks is not None:
        mem = root / "sys/devices/system/memory"
        mem.mkdir(parents=True)
        (mem / "block_size_bytes").write_text("8000000\n")  # 128 MiB, hex as the kernel writes it
        for i in range(blocks + 2):
            (mem / f"memory{i}").mkdir()
            (mem / f"memory{i}/online").write_text("1\n" if i < blocks else "0\n")
        (mem / "auto_online_blocks").write_text("online\n")
    return root


def specs_of(root: Path, **kw: Any) -> MachineSpecs:
    kw.setdefault("which", no_which)
    kw.setdefault("release", "6.1.0-18-amd64")
    kw.setdefault("machine", "x86_64")
    specs = detect_specs(kw.pop("debug", None), system=kw.pop("system", "Linux"), root=root, **kw)
    assert_no_unknowns(specs.data)
    json.dumps(specs.data)
    return specs


def test_linux_with_one_h200(tmp_path: Path) -> None:
    root = nvidia_root(linux_tree(tmp_path))
    specs = specs_of(root, nvml=fakes_nvml.one_h200())
    assert specs.data == {
        "cpu": "Intel(R) Xeon(R) Processor",
        "cpu_cores": 2,
        "ram": 24,
        "gpu": "NVIDIA H200",
        "vram": 140,
        "gpus": [
            {
                "name": "NVIDIA H200",
                "vram": 140,
                "vendor": "NVIDIA",
                "driver": "580.159.04",
                "uuid": fakes_nvml.H200["uuid"][:-2] + "00",
                "compute_capability": "9.0",
            }
        ],
        "os": "Linux 6.1",
        "arch": "x86_64",
    }
    rows = {r.what: r for r in specs.rows}
    assert rows["RAM"].value == "24 GB" and "192 online blocks of 128 MiB" in rows["RAM"].source
    assert rows["GPU"].source == "NVML" and rows["VRAM"].value == "140 GB"
    assert rows["CPU cores"].value == "2 physical"


def test_eight_and_mixed_gpus(tmp_path: Path) -> None:
    root = nvidia_root(linux_tree(tmp_path))
    eight = specs_of(root, nvml=fakes_nvml.eight_h200()).data
    assert (eight["gpu"], eight["vram"], len(eight["gpus"])) == ("8x NVIDIA H200", 1120, 8)
    mixed = specs_of(root, nvml=fakes_nvml.mixed()).data
    assert (mixed["gpu"], mixed["vram"]) == ("2x NVIDIA H200 + NVIDIA GeForce RTX 4090", 304)


def test_nvidia_smi_fallback_in_specs(tmp_path: Path) -> None:
    root = nvidia_root(linux_tree(tmp_path))

    def run(argv: Sequence[str], timeout_s: float) -> str:
        return "NVIDIA GeForce RTX 4090, 24564\nNVIDIA GeForce RTX 4090, 24564\n"

    data = specs_of(
        root, nvml=fakes_nvml.library_missing(), run=run, which=lambda n: "/usr/bin/nvidia-smi"
    ).data
    assert (data["gpu"], data["vram"]) == ("2x NVIDIA GeForce RTX 4090", 48)
    assert data["gpus"][0] == {"name": "NVIDIA GeForce RTX 4090", "vram": 24, "vendor": "NVIDIA"}


def test_no_gpu_means_no_gpu_keys(tmp_path: Path) -> None:
    specs = specs_of(linux_tree(tmp_path), nvml=fakes_nvml.driver_not_loaded())
    assert not {"gpu", "vram", "gpus", "unified_memory"} & specs.data.keys()
    assert [r.value for r in specs.rows if r.what == "GPU"] == ["none found"]


def test_ram_from_memtotal_when_no_memory_blocks(tmp_path: Path) -> None:
    specs = specs_of(linux_tree(tmp_path, blocks=None))
    assert specs.data["ram"] == 24
    assert [r.source for r in specs.rows if r.what == "RAM"] == ["/proc/meminfo MemTotal, rounded up"]


def test_memory_blocks_short_of_memtotal_are_not_trusted(tmp_path: Path) -> None:
    log = Log()
    specs = specs_of(linux_tree(tmp_path, blocks=8), debug=log)  # 1 GiB of blocks < MemTotal
    assert specs.data["ram"] == 24
    assert any("below MemTotal" in line for line in log)


@pytest.mark.parametrize(
    ("gib", "expected"),
    [
        (23.54, 24),  # this machine: 24,684,092 kB
        (125.87, 128),  # the recorded H200 VM: 131,981,020 kB
        (7.6, 8),
        (15.5, 16),
        (11.4, 12),
        (30.9, 32),
        (46.9, 48),
        (62.8, 64),
        (94.2, 96),
        (98.3, 100),
        (188.9, 192),
        (503.5, 504),
        (24.0, 24),
        (0.4, 1),
    ],
)
def test_round_up_ram(gib: float, expected: int) -> None:
    assert round_up_ram_gb(gib) == expected


@given(st.floats(min_value=0.01, max_value=8192))
def test_round_up_ram_is_never_below_and_close_above(gib: float) -> None:
    gb = round_up_ram_gb(gib)
    assert gb >= gib - 0.001
    assert gb <= math.ceil(gib) * 1.15 + 1


def test_arm_cpu_names(tmp_path: Path) -> None:
    grace = "processor\t: 0\nBogoMIPS\t: 2000.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n\n"
    assert linux_cpu_name(grace * 2).value == "ARM Neoverse-V2"  # type: ignore[union-attr]
    big_little = (
        "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\n\n"
        "processor\t: 1\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
    )
    assert linux_cpu_name(big_little).value == "ARM Cortex-A55 + ARM Cortex-A76"  # type: ignore[union-attr]
    armv7 = "processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\n\nHardware\t: BCM2835\n"
    assert linux_cpu_name(armv7).value == "ARMv7 Processor rev 4 (v7l)"  # type: ignore[union-attr]
    old = "Processor\t: ARMv6-compatible processor rev 7 (v6l)\nprocessor\t: 0\n\nHardware\t: BCM2708\n"
    found = linux_cpu_name(old)
    assert found is not None and found.value == "BCM2708"
    unknown_part = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xfff\n"
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("Raspberry Pi 5 Model B Rev 1.0\x00")
    assert linux_cpu_name(unknown_part, tmp_path).value == "Raspberry Pi 5 Model B Rev 1.0"  # type: ignore[union-attr]
    assert linux_cpu_name("processor\t: 0\n", tmp_path / "nothing") is None


def test_arm_cores_are_logical_when_no_topology(tmp_path: Path) -> None:
    cpuinfo = "".join(f"processor\t: {i}\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n\n" for i in range(72))
    data = specs_of(linux_tree(tmp_path, cpuinfo=cpuinfo), machine="aarch64").data
    assert (data["cpu"], data["cpu_cores"], data["arch"]) == ("ARM Neoverse-V2", 72, "aarch64")
    assert any(r.value == "72 logical" for r in specs_of(tmp_path, machine="aarch64").rows)


def test_every_probe_failing_still_gives_a_dict(tmp_path: Path) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(name)

    def bad_debug(text: str) -> None:
        raise ValueError("a broken logger")

    root = nvidia_root(tmp_path)  # no /proc/cpuinfo, no meminfo, no sysfs
    specs = detect_specs(bad_debug, system="Linux", root=root, nvml=Broken(), which=no_which, release="")
    assert isinstance(specs.data, dict)
    assert not {"cpu", "ram", "gpu", "vram", "gpus"} & specs.data.keys()
    assert_no_unknowns(specs.data)


def test_a_hanging_gpu_probe_is_abandoned_within_budget(tmp_path: Path) -> None:
    release = threading.Event()
    nvml = fakes_nvml.one_h200()
    real_init = nvml.nvmlInit

    def slow_init() -> None:
        release.wait(10)
        real_init()

    nvml.nvmlInit = slow_init  # type: ignore[method-assign]
    log = Log()
    started = time.monotonic()
    specs = specs_of(nvidia_root(linux_tree(tmp_path)), nvml=nvml, gpu_budget_s=0.2, debug=log)
    assert time.monotonic() - started < 3
    release.set()
    assert "gpu" not in specs.data and specs.data["ram"] == 24
    assert any("still running after 0.2 s" in line for line in log)


def test_macos_apple_silicon(tmp_path: Path) -> None:
    values = {
        "machdep.cpu.brand_string": "Apple M2 Max",
        "hw.memsize": str(32 * GIB),
        "hw.physicalcpu": "12",
        "hw.logicalcpu": "12",
        "iogpu.wired_limit_mb": "0",
    }
    calls: list[Sequence[str]] = []

    def sysctl(names: Sequence[str]) -> dict[str, str]:
        calls.append(names)
        return sysctl_of(values)(names)

    specs = specs_of(tmp_path, system="Darwin", sysctl=sysctl, release="14.5", machine="arm64")
    assert specs.data == {
        "cpu": "Apple M2 Max",
        "cpu_cores": 12,
        "ram": 32,
        "gpu": "Apple M2 Max",
        "vram": 21,
        "gpus": [{"name": "Apple M2 Max", "vram": 21, "vendor": "Apple"}],
        "unified_memory": True,
        "os": "macOS 14.5",
        "arch": "arm64",
    }
    assert len(calls) == 1  # one `sysctl` process for CPU, RAM and GPU


def test_macos_intel(tmp_path: Path) -> None:
    values = {
        "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz",
        "hw.memsize": str(16 * GIB),
    }
    data = specs_of(tmp_path, system="Darwin", sysctl=sysctl_of(values), release="13.6").data
    assert data["cpu"].startswith("Intel(R) Core(TM) i9") and data["ram"] == 16
    assert "gpu" not in data and "unified_memory" not in data


def windows_registry(build: str = "22631") -> FakeRegistry:
    reg = display_adapters()
    reg.keys[CPU_KEY] = {"ProcessorNameString": "AMD Ryzen 9 7950X 16-Core Processor            "}
    reg.keys[WINDOWS_KEY] = {"ProductName": "Windows 10 Pro", "CurrentBuildNumber": build}
    return reg


def test_windows(tmp_path: Path) -> None:
    specs = specs_of(
        tmp_path,
        system="Windows",
        release="10",
        machine="AMD64",
        registry=windows_registry(),
        nvml=fakes_nvml.one_h200(),
        win_memory_kb=lambda: 64 * 2**20,
    )
    data = specs.data
    assert data["cpu"] == "AMD Ryzen 9 7950X 16-Core Processor"
    assert (data["ram"], data["os"], data["arch"]) == (64, "Windows 11", "AMD64")
    assert (data["gpu"], data["vram"]) == ("NVIDIA H200 + AMD Radeon RX 7900 XTX", 164)
    assert data["cpu_cores"] > 0


def test_windows_10_and_registry_only_gpus(tmp_path: Path) -> None:
    data = specs_of(
        tmp_path,
        system="Windows",
        release="10",
        registry=windows_registry("19045"),
        nvml=fakes_nvml.library_missing(),
        win_memory_kb=lambda: None,
    ).data
    assert data["os"] == "Windows 10"
    assert data["gpu"] == "NVIDIA GeForce RTX 4090 + AMD Radeon RX 7900 XTX"
    assert data["ram"] > 0  # psutil's total, rounded up, when the firmware figure is missing
    # The GPUs come from the Display adapters class key (Windows' own GUID for it), and only from
    # there: the same entries under another device class (network adapters) are not GPUs.
    assert DISPLAY_CLASS.endswith(r"\Class\{4d36e968-e325-11ce-bfc1-08002be10318}")
    net_class = DISPLAY_CLASS.replace("4d36e968", "4d36e972")
    moved = windows_registry("19045")
    moved.keys = {k.replace(DISPLAY_CLASS, net_class): v for k, v in moved.keys.items()}
    elsewhere = specs_of(
        tmp_path,
        system="Windows",
        release="10",
        registry=moved,
        nvml=fakes_nvml.library_missing(),
        win_memory_kb=lambda: None,
    ).data
    assert "RTX 4090" not in str(elsewhere.get("gpu")) and "Radeon" not in str(elsewhere.get("gpu"))


def test_this_machine() -> None:
    log = Log()
    specs = detect_specs(log)
    assert {"cpu", "ram", "os", "arch"} <= specs.data.keys(), log
    assert isinstance(specs.data["ram"], int) and specs.data["ram"] > 0
    assert_no_unknowns(specs.data)
    json.dumps(specs.data)
    assert all(r.what and r.value and r.source for r in specs.rows)


def test_import_is_light() -> None:
    code = "import sys, llmroom_cli.specs\nprint([m for m in ('pynvml', 'psutil') if m in sys.modules])\n"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- --share: choosing what is sent -----------------------------------------------------------------


def _apple(tmp_path: Path) -> MachineSpecs:
    values = {"machdep.cpu.brand_string": "Apple M2 Max", "hw.memsize": str(32 * GIB), "hw.physicalcpu": "12"}
    return specs_of(tmp_path, system="Darwin", sysctl=sysctl_of(values), release="14.5", machine="arm64")


@pytest.mark.parametrize("scenario", ["h200", "apple", "no-gpu"])
def test_every_key_and_every_row_can_be_named_by_share(tmp_path: Path, scenario: str) -> None:
    if scenario == "apple":
        specs = _apple(tmp_path)
    elif scenario == "h200":
        specs = specs_of(nvidia_root(linux_tree(tmp_path)), nvml=fakes_nvml.one_h200())
    else:
        specs = specs_of(linux_tree(tmp_path))
    assert set(specs.data) <= set(SHARE_FIELDS)
    assert all(r.field in SHARE_FIELDS for r in specs.rows), [r.what for r in specs.rows]
    assert specs.select(SHARE_FIELDS).data == specs.data


def test_select_keeps_only_the_chosen_fields_in_data_and_rows(tmp_path: Path) -> None:
    specs = specs_of(nvidia_root(linux_tree(tmp_path)), nvml=fakes_nvml.one_h200())
    before = json.dumps(specs.data)
    chosen = specs.select(parse_share("gpu,vram,ram"))
    assert chosen.data == {"ram": 24, "gpu": "NVIDIA H200", "vram": 140}
    assert [r.what for r in chosen.rows] == ["RAM", "GPU", "VRAM"]
    assert json.dumps(specs.data) == before  # the detected specs are not changed
    assert [r.what for r in specs.select(["gpus"]).rows] == ["GPU 0"]
    assert specs.select(None) is specs


def test_a_chosen_field_the_machine_lacks_is_simply_absent(tmp_path: Path) -> None:
    specs = specs_of(linux_tree(tmp_path))  # no GPU
    chosen = specs.select(parse_share("gpu,vram"))
    assert chosen.data == {}
    assert [(r.what, r.value) for r in chosen.rows] == [("GPU", "none found")]


def test_select_copies_nested_values() -> None:
    data = {"gpus": [{"name": "A"}], "llm": {"server": "ollama"}, "cpu": "x"}
    out = select(data, ("gpus", "llm"))
    assert out == {"gpus": [{"name": "A"}], "llm": {"server": "ollama"}}
    out["gpus"][0]["name"] = "B"
    assert data["gpus"][0]["name"] == "A"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gpu,vram,ram", ("gpu", "vram", "ram")),
        (" GPU , Vram ,, ram,gpu", ("gpu", "vram", "ram")),
        (["gpu", "ram,cpu"], ("gpu", "ram", "cpu")),
        ("llm", ("llm",)),
    ],
)
def test_parse_share(given: Any, expected: tuple[str, ...]) -> None:
    assert parse_share(given) == expected


@pytest.mark.parametrize("given", ["gpu,vrm", "", " , ", "specs"])
def test_parse_share_refuses_an_unknown_or_empty_list_with_the_known_fields(given: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_share(given)
    assert caught.value.exit_code == 2
    assert "known fields: gpu, vram, ram, cpu, cpu_cores, gpus, unified_memory, os, arch, llm" in str(
        caught.value
    )
    if given == "gpu,vrm":
        assert caught.value.message == "--share: unknown field 'vrm'"


def test_the_specs_command_shows_the_share_selection() -> None:
    from tests.helpers import cli

    everything = json.loads(cli("specs", "--json").stdout)
    r = cli("specs", "--share", "ram,cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"cpu": everything["cpu"], "ram": everything["ram"]}
    table = cli("specs", "--share", "RAM", "--share", "os")
    assert table.returncode == 0, table.stderr
    assert [line.split("\t")[0] for line in table.stdout.splitlines()] == ["RAM", "OS"]
    assert table.stderr.startswith("not shared with --share ram,os: cpu")
    bad = cli("specs", "--share", "gpu,vrm")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == (
        "error: --share: unknown field 'vrm' (known fields: gpu, vram, ram, cpu, cpu_cores, gpus,"
        " unified_memory, os, arch, llm)\n"
    )
