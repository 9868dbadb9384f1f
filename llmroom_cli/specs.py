"""Machine specs (CPU, cores, RAM, OS, GPUs) as `join` sends them and `llmroom specs` shows them.

Cheap by design: /proc and /sys on Linux (no process is spawned; psutil is not needed), the registry on
Windows, one `sysctl` process on macOS. GPU detection (gpu.py) runs in a thread meanwhile, within its own
time budget. A value that cannot be read is absent from `data`, never null, 0 or "Unknown". Never raises.
"""

from __future__ import annotations

import copy
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmroom_cli.errors import UsageError
from llmroom_cli.gpu import (
    GIB,
    SMI_TIMEOUT_S,
    Debug,
    GpuInfo,
    Registry,
    Runner,
    Sysctl,
    Which,
    WinRegistry,
    current_system,
    detect_gpus,
    read_sysctl,
    run_command,
    safe_debug,
    summarize,
    total_vram_gb,
)

# NVML's init takes ~15 ms with persistence mode on, but seconds on a multi-GPU box without it, and a GPU
# in a bad state can hang it: past this budget `join` goes on without GPU keys (the thread is a daemon).
GPU_BUDGET_S = 5.0
CPU_KEY = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
WINDOWS_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion"
MAC_SYSCTLS = (
    "machdep.cpu.brand_string",
    "hw.memsize",
    "hw.physicalcpu",
    "hw.logicalcpu",
    "iogpu.wired_limit_mb",  # last: unknown before macOS 14
)
# ARM "CPU implementer" / "CPU part" codes from /proc/cpuinfo, as lscpu names them (arm64 kernels have no
# "model name" line). Not exhaustive: the cores found in machines that run LLMs.
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0xc0": "Ampere"}
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510",
    ("0x41", "0xd47"): "Cortex-A710",
    ("0x41", "0xd48"): "Cortex-X2",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4b"): "Cortex-A78C",
    ("0x41", "0xd4d"): "Cortex-A715",
    ("0x41", "0xd4e"): "Cortex-X3",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd80"): "Cortex-A520",
    ("0x41", "0xd81"): "Cortex-A720",
    ("0x41", "0xd82"): "Cortex-X4",
    ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd85"): "Cortex-X925",
    ("0x41", "0xd87"): "Cortex-A725",
    ("0x4e", "0x004"): "Carmel",
    ("0xc0", "0xac3"): "Ampere-1",
    ("0xc0", "0xac4"): "Ampere-1a",
}


# The fields `--share` can name: every key `data` may carry, and `llm` (the shared model, which `join`
# adds: server kind, version, context, quantization, and the `--bench` figures).
SHARE_FIELDS = ("gpu", "vram", "ram", "cpu", "cpu_cores", "gpus", "unified_memory", "os", "arch", "llm")


@dataclass
class SpecRow:
    """One line of the human table: what, its value, where it was read from, and the `data` key it
    shows (what `--share` names)."""

    what: str
    value: str
    source: str
    field: str = ""


@dataclass
class MachineSpecs:
    """`data` is exactly what `join` sends as `specs` (and `specs --json` prints); `rows` the human table."""

    data: dict[str, Any] = field(default_factory=dict)
    rows: list[SpecRow] = field(default_factory=list)

    def select(self, fields: Sequence[str] | None) -> MachineSpecs:
        """Only the chosen fields (`parse_share`), in data and rows alike; None keeps everything."""
        if fields is None:
            return self
        return MachineSpecs(select(self.data, fields), [r for r in self.rows if r.field in fields])


def parse_share(values: str | Sequence[str]) -> tuple[str, ...]:
    """The fields of `--share gpu,vram,ram` (repeatable, any case, spaces ignored), or UsageError
    (exit 2, raised before any network) naming the unknown field and the known ones."""
    items = [values] if isinstance(values, str) else list(values)
    names = [n.strip().lower() for item in items for n in item.split(",")]
    names = [n for n in names if n]
    known = ", ".join(SHARE_FIELDS)
    if not names:
        raise UsageError("--share needs at least one field", f"known fields: {known}; or --no-specs")
    for name in names:
        if name not in SHARE_FIELDS:
            raise UsageError(f"--share: unknown field {name!r}", f"known fields: {known}")
    return tuple(dict.fromkeys(names))


def select(specs: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """The specs with only `fields` kept (in the specs' own order); a copy: the original is unchanged."""
    return {k: copy.deepcopy(v) for k, v in specs.items() if k in fields}


@dataclass
class _Found:
    value: Any
    source: str


def detect_specs(
    debug: Callable[[str], None] | None = None,
    *,
    system: str | None = None,
    release: str | None = None,
    machine: str | None = None,
    root: Path = Path("/"),
    nvml: Any = None,
    run: Runner = run_command,
    which: Which | None = None,
    registry: Registry | None = None,
    sysctl: Sysctl | None = None,
    win_memory_kb: Callable[[], int | None] | None = None,
    gpu_budget_s: float = GPU_BUDGET_S,
    smi_timeout_s: float = SMI_TIMEOUT_S,
) -> MachineSpecs:
    """This machine's specs; every probe that fails only drops its keys. Never raises.

    The keyword arguments replace the platform readers in tests: `system` / `release` / `machine` as
    platform.system() / release() (on macOS: the macOS version) / machine() would say, `root` for /proc
    and /sys, `nvml` a fake pynvml, `run` / `which` for subprocesses, `registry` (Windows), `sysctl`
    (macOS), `win_memory_kb` (Windows GetPhysicallyInstalledSystemMemory).
    """
    log = safe_debug(debug)
    specs = MachineSpecs()
    env = _Env(
        system or current_system(), release, machine, root, nvml, run, which, registry or WinRegistry()
    )
    try:
        _detect(specs, log, env, sysctl, win_memory_kb, gpu_budget_s, smi_timeout_s)
    except Exception as exc:  # a bug here must not stop `join`: send what was found so far
        log(f"specs: detection failed: {exc!r}")
    specs.data = _clean(specs.data)
    return specs


@dataclass
class _Env:
    system: str
    release: str | None
    machine: str | None
    root: Path
    nvml: Any
    run: Runner
    which: Which | None
    reg: Registry


def _detect(
    specs: MachineSpecs,
    log: Debug,
    env: _Env,
    sysctl: Sysctl | None,
    win_memory_kb: Callable[[], int | None] | None,
    gpu_budget_s: float,
    smi_timeout_s: float,
) -> None:
    system, root, reg = env.system, env.root, env.reg
    mac: dict[str, str] = {}
    if system == "Darwin":
        mac = _safe(log, "sysctl", lambda: (sysctl or read_sysctl)(MAC_SYSCTLS)) or {}

    def mac_sysctl(names: Any) -> dict[str, str]:  # one `sysctl` process serves CPU, RAM and GPU
        return {k: v for k, v in mac.items() if k in names}

    box: list[list[GpuInfo]] = []

    def gpu_job() -> None:
        box.append(
            detect_gpus(
                log,
                system=system,
                root=root,
                nvml=env.nvml,
                run=env.run,
                which=env.which,
                registry=reg,
                sysctl=mac_sysctl,
                smi_timeout_s=smi_timeout_s,
            )  # fmt: skip
        )

    worker = threading.Thread(target=gpu_job, name="llmroom-gpu", daemon=True)
    worker.start()

    if system == "Linux":
        cpu, cores, ram = _linux(root, log)
    elif system == "Darwin":
        cpu, cores, ram = _macos(mac)
    elif system == "Windows":
        cpu, cores, ram = _windows(reg, win_memory_kb, log)
    else:
        cpu, cores, ram = None, _logical_cores(), _psutil_ram(log)
    os_name = _safe(log, "os", lambda: _os_name(system, env.release, reg))
    arch = env.machine if env.machine is not None else _machine()

    worker.join(gpu_budget_s)
    if worker.is_alive() or not box:
        log(f"gpu: detection still running after {gpu_budget_s:g} s: no GPU keys")
        gpus: list[GpuInfo] = []
    else:
        gpus = box[0]
    _assemble(specs, system, cpu, cores, ram, gpus, os_name, arch or None)


def _assemble(
    specs: MachineSpecs,
    system: str,
    cpu: _Found | None,
    cores: _Found | None,
    ram: _Found | None,
    gpus: list[GpuInfo],
    os_name: _Found | None,
    arch: str | None,
) -> None:
    data = specs.data
    rows = specs.rows
    if cpu is not None:
        data["cpu"] = cpu.value
        rows.append(SpecRow("CPU", cpu.value, cpu.source, "cpu"))
    if cores is not None:
        count, kind = cores.value
        data["cpu_cores"] = count
        rows.append(SpecRow("CPU cores", f"{count} {kind}", cores.source, "cpu_cores"))
    if ram is not None:
        data["ram"] = ram.value
        rows.append(SpecRow("RAM", f"{ram.value} GB", ram.source, "ram"))
    gpu = summarize(gpus)
    if gpu:
        sources = ", ".join(dict.fromkeys(g.source for g in gpus))
        data["gpu"] = gpu
        rows.append(SpecRow("GPU", gpu, sources, "gpu"))
        vram = total_vram_gb(gpus)
        if vram:
            data["vram"] = vram
            what = "GPU memory (shared)" if gpus[0].vendor == "Apple" else "VRAM"
            rows.append(SpecRow(what, f"{vram} GB", sources, "vram"))
        data["gpus"] = [g.to_dict() for g in gpus]
        for i, g in enumerate(gpus):
            details = [f"{g.vram_gb} GB" if g.vram_gb else "", f"driver {g.driver}" if g.driver else ""]
            details.append(f"compute {g.compute_capability}" if g.compute_capability else "")
            text = ", ".join(d for d in details if d)
            rows.append(SpecRow(f"GPU {i}", f"{g.name} ({text})" if text else g.name, g.source, "gpus"))
        if gpus[0].vendor == "Apple":
            data["unified_memory"] = True
            rows.append(
                SpecRow("Unified memory", "yes: the GPU uses system RAM", "Apple Silicon", "unified_memory")
            )
    else:
        tried = {"Linux": "NVML, nvidia-smi, /sys/class/drm", "Darwin": "sysctl", "Windows": "NVML, registry"}
        rows.append(SpecRow("GPU", "none found", tried.get(system, "NVML, nvidia-smi"), "gpu"))
    if os_name is not None:
        data["os"] = os_name.value
        rows.append(SpecRow("OS", os_name.value, os_name.source, "os"))
    if arch:
        data["arch"] = arch
        rows.append(SpecRow("Arch", arch, "uname machine", "arch"))


def _clean(value: Any) -> Any:
    """Drop unknowns recursively: a key is absent rather than null, 0, "", false or "Unknown"."""
    if isinstance(value, dict):
        out = {k: _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if _known(v)}
    if isinstance(value, list):
        return [v for v in (_clean(x) for x in value) if _known(v)]
    return value


def _known(value: Any) -> bool:
    if value is None or value is False or value == 0 or value in ("", [], {}):
        return False
    return not (isinstance(value, str) and value.strip().lower() in ("unknown", "n/a", "none"))


def _safe(log: Debug, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        log(f"specs: {what} failed: {exc!r}")
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


# -- Linux --------------------------------------------------------------------------------------------


def _linux(root: Path, log: Debug) -> tuple[_Found | None, _Found | None, _Found | None]:
    cpuinfo = _read(root / "proc/cpuinfo")
    if cpuinfo is None:
        log("specs: /proc/cpuinfo unreadable")
    cpu = _safe(log, "cpu", lambda: linux_cpu_name(cpuinfo or "", root))
    cores = _safe(log, "cores", lambda: _linux_cores(cpuinfo or ""))
    ram = _safe(log, "ram", lambda: _linux_ram(root, log))
    return cpu, cores, ram


def linux_cpu_name(cpuinfo: str, root: Path = Path("/")) -> _Found | None:
    """ "model name" (x86 and some ARM); else the ARM core from implementer/part codes (as lscpu does);
    else "Hardware" / "Processor" (32-bit ARM kernels); else the device-tree model (a board name)."""
    fields = _first_fields(cpuinfo)
    if fields.get("model name"):
        return _Found(fields["model name"], "/proc/cpuinfo model name")
    cores: list[str] = []
    for block in cpuinfo.split("\n\n"):
        f = _first_fields(block)
        impl, part = f.get("cpu implementer", "").lower(), f.get("cpu part", "").lower()
        if impl in ARM_IMPLEMENTERS:
            name = ARM_PARTS.get((impl, part))
            label = f"{ARM_IMPLEMENTERS[impl]} {name}" if name else None
            if label and label not in cores:
                cores.append(label)
    if cores:
        # big.LITTLE: "ARM Cortex-A76 + ARM Cortex-A55", in the order the kernel lists the cores
        return _Found(" + ".join(cores), "/proc/cpuinfo CPU implementer / part")
    for key in ("hardware", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # x86's "processor : 0" is an index, not a name
            return _Found(value, f"/proc/cpuinfo {key.title()}")
    model = _read(root / "proc/device-tree/model")
    if model and model.strip("\x00 \n"):
        return _Found(model.strip("\x00 \n"), "/proc/device-tree/model")
    return None


def _first_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in out:
            out[key] = value.strip()
    return out


def _linux_cores(cpuinfo: str) -> _Found | None:
    pairs: set[tuple[str, str]] = set()
    logical = 0
    phys = core = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and phys is not None and core is not None:
            pairs.add((phys, core))
            phys = core = None
    if phys is not None and core is not None:
        pairs.add((phys, core))
    if pairs:
        return _Found((len(pairs), "physical"), "/proc/cpuinfo physical id / core id")
    count = logical or os.cpu_count()
    return _Found((count, "logical"), "/proc/cpuinfo processors") if count else None


def _linux_ram(root: Path, log: Debug) -> _Found | None:
    mem_total_kb = None
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total_kb = int(line.split()[1])
            break
    blocks = _memory_blocks(root / "sys/devices/system/memory", log)
    if blocks is not None:
        size, count = blocks
        total = size * count
        if mem_total_kb is None or total >= mem_total_kb * 1024:
            source = f"/sys/devices/system/memory ({count} online blocks of {size // 2**20} MiB)"
            return _Found(round(total / GIB), source)
        log(f"specs: memory blocks ({total} B) below MemTotal; using MemTotal")
    if mem_total_kb:
        return _Found(round_up_ram_gb(mem_total_kb * 1024 / GIB), "/proc/meminfo MemTotal, rounded up")
    return None


def _memory_blocks(base: Path, log: Debug) -> tuple[int, int] | None:
    """(block size, online blocks): installed memory the kernel manages, without MemTotal's shortfall
    (the kernel's own code and the firmware's reservations are not in MemTotal)."""
    size_text = _read(base / "block_size_bytes")
    if not size_text:
        return None
    size = int(size_text.strip(), 16)
    online = 0
    with os.scandir(base) as entries:
        for entry in entries:
            if entry.name.startswith("memory") and entry.name[6:].isdigit():
                # os.open/os.read: ~3 us a block, so 1,000 blocks of a large machine cost ~3 ms
                try:
                    fd = os.open(os.path.join(entry.path, "online"), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    online += os.read(fd, 8).strip() == b"1"
                finally:
                    os.close(fd)
    if not size or not online:
        log("specs: no online memory blocks")
        return None
    return size, online


def round_up_ram_gb(gib: float) -> int:
    """MemTotal (0.5-3 % short of what is installed) rounded up to a size memory is sold in: the next
    whole GB below 16, even up to 64 (24, 48), a multiple of 4 up to 256 (96, 128, 192), of 8 above."""
    step = 1 if gib <= 16 else 2 if gib <= 64 else 4 if gib <= 256 else 8
    return max(1, step * math.ceil(round(gib, 3) / step))


# -- macOS --------------------------------------------------------------------------------------------


def _macos(values: dict[str, str]) -> tuple[_Found | None, _Found | None, _Found | None]:
    brand = values.get("machdep.cpu.brand_string", "").strip()
    cpu = _Found(brand, "sysctl machdep.cpu.brand_string") if brand else None
    cores = None
    for key, kind in (("hw.physicalcpu", "physical"), ("hw.logicalcpu", "logical")):
        if values.get(key, "").isdigit() and int(values[key]) > 0:
            cores = _Found((int(values[key]), kind), f"sysctl {key}")
            break
    ram = None
    if values.get("hw.memsize", "").isdigit():
        ram = _Found(round(int(values["hw.memsize"]) / GIB), "sysctl hw.memsize")
    return cpu, cores, ram


# -- Windows ------------------------------------------------------------------------------------------


def _windows(
    reg: Registry, win_memory_kb: Callable[[], int | None] | None, log: Debug
) -> tuple[_Found | None, _Found | None, _Found | None]:
    name = _safe(log, "cpu", lambda: reg.value(CPU_KEY, "ProcessorNameString"))
    # Intel pads the name with spaces; collapse them
    cpu = _Found(" ".join(str(name).split()), "registry ProcessorNameString") if name else None
    cores = _safe(log, "cores", _psutil_cores)
    kb = _safe(log, "ram", win_memory_kb or _installed_memory_kb)
    if isinstance(kb, int) and kb > 0:
        return cpu, cores, _Found(round(kb * 1024 / GIB), "GetPhysicallyInstalledSystemMemory")
    return cpu, cores, _psutil_ram(log)


def _installed_memory_kb() -> int | None:
    """Installed RAM per the firmware tables (what the owner bought), not what Windows can use."""
    if os.name != "nt":
        return None
    import ctypes

    kb = ctypes.c_ulonglong(0)
    ok = ctypes.windll.kernel32.GetPhysicallyInstalledSystemMemory(ctypes.byref(kb))  # type: ignore[attr-defined, unused-ignore]
    return int(kb.value) if ok else None


def _psutil_cores() -> _Found | None:
    import psutil  # type: ignore[import-untyped, unused-ignore]

    physical = psutil.cpu_count(logical=False)
    if physical:
        return _Found((physical, "physical"), "psutil.cpu_count(logical=False)")
    return _logical_cores()


def _logical_cores() -> _Found | None:
    count = os.cpu_count()
    return _Found((count, "logical"), "os.cpu_count()") if count else None


def _psutil_ram(log: Debug) -> _Found | None:
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        total = int(psutil.virtual_memory().total)
    except Exception as exc:
        log(f"specs: psutil memory failed: {exc!r}")
        return None
    return _Found(round_up_ram_gb(total / GIB), "psutil total, rounded up") if total > 0 else None


def _machine() -> str:
    # platform.machine() and platform.release() are os.uname() fields; importing platform costs 13 ms
    # (and platform.platform() / processor() would spawn `uname -p`, which is never called).
    if os.name == "nt":
        import platform

        return platform.machine()
    return os.uname().machine


def _release() -> str:
    if os.name == "nt":
        import platform

        return platform.release()
    return os.uname().release


# -- OS name ------------------------------------------------------------------------------------------


def _os_name(system: str, release: str | None, reg: Registry) -> _Found | None:
    if system == "Darwin":
        if release is None:
            import platform

            release = platform.mac_ver()[0]  # reads SystemVersion.plist; no process
        return _Found(f"macOS {release}".strip(), "platform.mac_ver()")
    if release is None:
        release = _release()
    if system == "Windows":
        product = str(reg.value(WINDOWS_KEY, "ProductName") or "")
        if product.startswith("Windows Server"):
            return _Found(product, "registry ProductName")
        build = str(reg.value(WINDOWS_KEY, "CurrentBuildNumber") or "")
        # Windows 11 still says "10" in ProductName and (before Python 3.12) platform.release()
        if build.isdigit() and int(build) >= 22000:
            return _Found("Windows 11", "registry CurrentBuildNumber")
        return _Found(f"Windows {release}".strip(), "platform.release()")
    match = re.match(r"(\d+)\.(\d+)", release or "")
    version = f"{match.group(1)}.{match.group(2)}" if match else release
    return _Found(f"{system} {version}".strip(), "uname") if system else None
