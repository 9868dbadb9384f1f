"""GPU detection for every vendor: NVML (the only module that imports pynvml), nvidia-smi, AMD and Intel
sysfs, Apple Silicon, the Windows registry. Lazy (nothing native is touched at import) and it never raises.

Each probe has its own fallback and time budget; a probe that fails is logged through the `debug`
callback and contributes nothing. Every platform reader is injectable so tests run without hardware:
`root` (the `/` that /proc, /sys and /dev hang from), `nvml` (a module or fake with pynvml's API),
`run` (argv, timeout_s -> stdout), `which`, `registry` (Windows) and `sysctl` (macOS).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Debug = Callable[[str], None]
# argv, timeout_s -> stdout; raises (subprocess.TimeoutExpired, CalledProcessError, OSError) on failure
Runner = Callable[[Sequence[str], float], str]
Which = Callable[[str], "str | None"]
# names -> {name: value} for the names the system knows (macOS `sysctl`)
Sysctl = Callable[[Sequence[str]], "dict[str, str]"]

GIB = 2**30
MIB = 2**20
SMI_TIMEOUT_S = 2.0
# Below this much dedicated memory an AMD/Intel/Windows adapter is taken for an integrated GPU's carve-out
# of system RAM (a Ryzen APU reports 512 MiB-2 GiB, Intel UHD 128 MiB): it is left out, with a debug line,
# rather than reported as a GPU with "vram": 1 that is really shared RAM. A Strix Halo-style APU with a
# large BIOS carve-out (e.g. 64 GiB) is reported: that memory really is reserved for the GPU.
MIN_DEDICATED_BYTES = 2 * GIB
SMI_QUERY = "--query-gpu=name,memory.total,driver_version,uuid"
DISPLAY_CLASS = r"SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"
PCI_IDS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids", "usr/share/pci.ids")
VENDORS = {"10de": "NVIDIA", "1002": "AMD", "8086": "Intel"}


@dataclass
class GpuInfo:
    """One physical GPU. `vram_bytes` is None when the probe could not read it."""

    name: str
    vram_bytes: int | None
    vendor: str
    driver: str | None = None
    uuid: str | None = None
    compute_capability: str | None = None
    source: str = ""

    @property
    def vram_gb(self) -> int | None:
        """Whole GB as owners count them: round(bytes / 2**30) (H200: 150,754,820,096 -> 140)."""
        if not self.vram_bytes:
            return None
        return round(self.vram_bytes / GIB) or None

    def to_dict(self) -> dict[str, Any]:
        """The entry in `specs.gpus`; unknown fields are absent, never null."""
        out: dict[str, Any] = {"name": self.name, "vram": self.vram_gb, "vendor": self.vendor}
        out.update(driver=self.driver, uuid=self.uuid, compute_capability=self.compute_capability)
        return {k: v for k, v in out.items() if v not in (None, "")}


class Registry(Protocol):
    """Read-only view of HKEY_LOCAL_MACHINE (64-bit view); both methods answer None / [] when absent."""

    def value(self, path: str, name: str) -> Any: ...

    def subkeys(self, path: str) -> list[str]: ...


def summarize(gpus: Sequence[GpuInfo]) -> str | None:
    """ "NVIDIA H200", "8x NVIDIA H200", "2x NVIDIA H200 + NVIDIA GeForce RTX 4090"; None without GPUs."""
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    parts = [name if n == 1 else f"{n}x {name}" for name, n in counts.items()]
    return " + ".join(parts) or None


def total_vram_gb(gpus: Sequence[GpuInfo]) -> int | None:
    """Sum of each GPU's rounded GB; None when any GPU's memory is unknown (a partial sum would mislead)."""
    sizes = [g.vram_gb for g in gpus]
    if not sizes or any(s is None for s in sizes):
        return None
    return sum(s for s in sizes if s is not None)


def run_command(argv: Sequence[str], timeout_s: float) -> str:
    """The default `run`: stdout of a command, raising on a non-zero exit or after `timeout_s`."""
    import subprocess  # not at import time: 5 ms that most runs never need

    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=True, stdin=subprocess.DEVNULL
    )
    return done.stdout


def read_sysctl(names: Sequence[str]) -> dict[str, str]:
    """The default macOS `sysctl` reader: one `sysctl` process for all names.

    Without -n each line is "name: value", so an unknown name (iogpu.wired_limit_mb before macOS 14)
    only loses its own line; the exit status is then non-zero and is ignored on purpose.
    """
    import subprocess

    exe = "/usr/sbin/sysctl" if os.path.exists("/usr/sbin/sysctl") else "sysctl"
    try:
        done = subprocess.run(
            [exe, *names], capture_output=True, text=True, timeout=SMI_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names and value.strip():
            out[key.strip()] = value.strip()
    return out


class WinRegistry:
    """The default `registry`: HKLM through winreg (64-bit view); None / [] if absent or not on Windows."""

    def value(self, path: str, name: str) -> Any:
        if sys.platform != "win32":
            return None
        import winreg

        try:
            access = winreg.KEY_READ | winreg.KEY_WOW64_64KEY
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, access) as key:
                return winreg.QueryValueEx(key, name)[0]
        except OSError:
            return None

    def subkeys(self, path: str) -> list[str]:
        if sys.platform != "win32":
            return []
        import winreg

        names: list[str] = []
        try:
            access = winreg.KEY_READ | winreg.KEY_WOW64_64KEY
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, access) as key:
                for i in range(winreg.QueryInfoKey(key)[0]):
                    names.append(winreg.EnumKey(key, i))
        except OSError:
            pass
        return names


def detect_gpus(
    debug: Debug | None = None,
    *,
    system: str | None = None,
    root: Path = Path("/"),
    nvml: Any = None,
    run: Runner = run_command,
    which: Which | None = None,
    registry: Registry | None = None,
    sysctl: Sysctl | None = None,
    smi_timeout_s: float = SMI_TIMEOUT_S,
) -> list[GpuInfo]:
    """Every physical GPU of this machine, NVIDIA first; [] when none is found. Never raises.

    `nvml=None` imports the real pynvml (only if an NVIDIA driver shows on Linux); tests pass a fake.
    """
    log = safe_debug(debug)
    system = system or current_system()
    which = which or _shutil_which
    try:
        if system == "Darwin":
            return _apple(sysctl or read_sysctl, log)
        gpus = _nvidia(system, root, nvml, run, which, smi_timeout_s, log)
        if system == "Linux":
            gpus += _probe("AMD/Intel sysfs", log, lambda: _drm(root, run, which, smi_timeout_s, log))
        elif system == "Windows":
            others = _probe("registry", log, lambda: _windows_registry(registry or WinRegistry(), log))
            if gpus:  # NVML already counted the NVIDIA boards; the registry would count them twice
                others = [g for g in others if g.vendor != "NVIDIA"]
            gpus += others
        return gpus
    except Exception as exc:  # a bug in a probe must not stop `join`
        log(f"gpu: detection failed: {exc!r}")
        return []


def current_system() -> str:
    """platform.system() without importing platform (13 ms): it reads the same os.uname()."""
    return "Windows" if os.name == "nt" else os.uname().sysname


def _shutil_which(name: str) -> str | None:
    import shutil  # 4 ms (it pulls in bz2 and lzma): only when a command is looked for

    return shutil.which(name)


def safe_debug(debug: Debug | None) -> Debug:
    """The debug callback, made unable to raise (a broken logger must not break detection)."""

    def log(text: str) -> None:
        if debug is not None:
            try:
                debug(text)
            except Exception:
                pass

    return log


def _probe(what: str, log: Debug, fn: Callable[[], list[GpuInfo]]) -> list[GpuInfo]:
    try:
        return fn()
    except Exception as exc:
        log(f"gpu: {what} probe failed: {exc!r}")
        return []


def _text(value: Any) -> str:
    """Older bindings return bytes for names and UUIDs, newer ones str."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().strip("\x00").strip()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    try:
        return int(text, base) if text else None
    except ValueError:
        return None


# -- NVIDIA --------------------------------------------------------------------------------------------


def _nvidia(
    system: str, root: Path, nvml: Any, run: Runner, which: Which, timeout_s: float, log: Debug
) -> list[GpuInfo]:
    if system == "Linux" and not _nvidia_driver_present(root):
        # Importing pynvml costs ~0.1 s and nvidia-smi a process: not worth it without the kernel driver.
        log("nvidia: no driver (/proc/driver/nvidia, /dev/nvidiactl, /dev/dxg absent): NVML skipped")
        return []
    found = _nvml_gpus(nvml, log)
    if found is not None:
        return found
    return _nvidia_smi(run, which, timeout_s, log)


def _nvidia_driver_present(root: Path) -> bool:
    # /dev/dxg: WSL2, where NVML comes from /usr/lib/wsl/lib without /proc/driver/nvidia.
    marks = ("proc/driver/nvidia", "dev/nvidiactl", "dev/nvidia0", "dev/dxg")
    return any((root / mark).exists() for mark in marks)


def _nvml_gpus(nvml: Any, log: Debug) -> list[GpuInfo] | None:
    """GPUs through NVML, or None when NVML is missing or fails (the caller then tries nvidia-smi)."""
    if nvml is None:
        try:
            import pynvml

            nvml = pynvml
        except Exception as exc:
            log(f"nvml: pynvml not importable: {exc!r}")
            return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        log(f"nvml: init failed: {type(exc).__name__}: {exc}")
        return None
    try:
        driver = _nvml_opt(log, "driver version", lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        count = int(nvml.nvmlDeviceGetCount())
        gpus: list[GpuInfo] = []
        # Physical devices only: MIG instances are reached through nvmlDeviceGetMigDeviceHandleByIndex,
        # which is never called, so a MIG-enabled GPU is counted once with its full memory.
        for index in range(count):
            gpu = _nvml_device(nvml, index, driver, log)
            if gpu is not None:
                gpus.append(gpu)
        return gpus
    except Exception as exc:
        log(f"nvml: query failed: {type(exc).__name__}: {exc}")
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log(f"nvml: shutdown failed: {exc!r}")


def _nvml_device(nvml: Any, index: int, driver: str | None, log: Debug) -> GpuInfo | None:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
    except Exception as exc:  # NoPermission, GpuIsLost: skip this board, keep the others
        log(f"nvml: GPU {index} skipped: {type(exc).__name__}: {exc}")
        return None
    if not name:
        log(f"nvml: GPU {index} has no name; skipped")
        return None
    # nvmlDeviceGetMemoryInfo v1 and v2 agree on `total` (the H200 recording: 150,754,820,096 both) and
    # differ only in how they split the rest: v1 counts the driver's reservation as `used`, v2 moves it to
    # `reserved`. Only `total` is reported, so the v1 call, which every driver has, is enough.
    vram = _nvml_opt(log, f"GPU {index} memory", lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total))
    uuid = _nvml_opt(log, f"GPU {index} uuid", lambda: _text(nvml.nvmlDeviceGetUUID(handle)))
    cc = _nvml_opt(log, f"GPU {index} compute capability", lambda: _cc(nvml, handle))
    mig = _nvml_opt(log, f"GPU {index} MIG mode", lambda: int(nvml.nvmlDeviceGetMigMode(handle)[0]))
    if mig:
        log(f"nvml: GPU {index} has MIG enabled; reported once with its full memory")
    return GpuInfo(name, vram or None, "NVIDIA", driver, uuid or None, cc, "NVML")


def _cc(nvml: Any, handle: Any) -> str:
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return f"{int(major)}.{int(minor)}"


def _nvml_opt(log: Debug, what: str, fn: Callable[[], Any]) -> Any:
    """One metric with its own fallback: None (and a debug line) instead of an exception."""
    try:
        return fn()
    except Exception as exc:  # NVMLError_NotSupported on a GPU without it (GB10 memory), FunctionNotFound
        log(f"nvml: {what}: {type(exc).__name__}: {exc}")
        return None


def _nvidia_smi(run: Runner, which: Which, timeout_s: float, log: Debug) -> list[GpuInfo]:
    exe = which("nvidia-smi")
    if not exe:
        log("nvidia-smi: not found on PATH")
        return []
    import subprocess

    try:
        out = run([exe, SMI_QUERY, "--format=csv,noheader,nounits"], timeout_s)
    except subprocess.TimeoutExpired:
        log(f"nvidia-smi: no answer within {timeout_s:g} s")
        return []
    except Exception as exc:
        log(f"nvidia-smi: failed: {exc!r}")
        return []
    return parse_nvidia_smi(out, log)


def parse_nvidia_smi(out: str, log: Debug | None = None) -> list[GpuInfo]:
    """Lines of `name, memory.total [MiB][, driver_version, uuid]`; "[N/A]" fields are left unknown."""
    gpus: list[GpuInfo] = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if not fields or not fields[0] or fields[0].startswith("["):
            continue
        fields += [""] * (4 - len(fields))
        name, mib, driver, uuid = fields[:4]
        vram = int(mib) * MIB if mib.isdigit() and int(mib) > 0 else None
        if vram is None and log is not None:
            log(f"nvidia-smi: no memory total for {name} ({mib or 'missing'})")
        gpus.append(
            GpuInfo(name, vram, "NVIDIA", _known(driver), _known(uuid), source="nvidia-smi"),
        )
    return gpus


def _known(field: str) -> str | None:
    return field if field and not field.startswith("[") else None


# -- AMD and Intel on Linux (sysfs) --------------------------------------------------------------------


def _drm(root: Path, run: Runner, which: Which, timeout_s: float, log: Debug) -> list[GpuInfo]:
    drm = root / "sys/class/drm"
    try:
        cards = [p for p in drm.iterdir() if re.fullmatch(r"card\d+", p.name)]  # not card0-DP-1 connectors
    except OSError:
        return []
    cards.sort(key=lambda p: int(p.name[4:]))
    amd: list[Path] = []
    intel: list[Path] = []
    seen: set[str] = set()
    for card in cards:
        dev = card / "device"
        vendor = (_read(dev / "vendor") or "").lower()
        key = os.path.realpath(dev)
        if key in seen:
            continue
        seen.add(key)
        if vendor == "0x1002":
            amd.append(card)
        elif vendor == "0x8086":
            intel.append(card)
    gpus: list[GpuInfo] = []
    if amd:
        found = _amdsmi(log)
        gpus += found if found is not None else _amd_sysfs(root, amd, run, which, timeout_s, log)
    if intel:
        gpus += _intel_sysfs(root, intel, log)
    return gpus


def _amdsmi(log: Debug) -> list[GpuInfo] | None:
    """AMD GPUs through amdsmi (ROCm's binding) when installed; None when unavailable or failing."""
    try:
        import amdsmi  # type: ignore[import-not-found, unused-ignore]
    except Exception as exc:
        log(f"amdsmi: not importable ({type(exc).__name__}); using sysfs")
        return None
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:
        log(f"amdsmi: init failed: {exc!r}; using sysfs")
        return None
    try:
        gpus: list[GpuInfo] = []
        for handle in amdsmi.amdsmi_get_processor_handles():
            asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
            name = _text(asic.get("market_name") or "")
            vram_info = amdsmi.amdsmi_get_gpu_vram_info(handle)
            mib = vram_info.get("vram_size", vram_info.get("vram_total"))  # MB; the key changed in ROCm 6
            vram = int(mib) * MIB if isinstance(mib, int) and mib > 0 else None
            if not name or name == "N/A":
                continue
            if vram is not None and vram < MIN_DEDICATED_BYTES:
                log(f"amdsmi: {name} has {vram // MIB} MiB: an APU carve-out; left out")
                continue
            gpus.append(GpuInfo(name, vram, "AMD", source="amdsmi"))
        return gpus
    except Exception as exc:
        log(f"amdsmi: query failed: {exc!r}; using sysfs")
        return None
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception:
            pass


def _amd_sysfs(
    root: Path, cards: list[Path], run: Runner, which: Which, timeout_s: float, log: Debug
) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for card in cards:
        dev = card / "device"
        vram = _read_int(dev / "mem_info_vram_total")
        if vram is not None and vram < MIN_DEDICATED_BYTES:
            log(f"sysfs: {card.name} (AMD) has {vram // MIB} MiB VRAM: an APU carve-out; left out")
            continue
        name = _read(dev / "product_name") or _pci_name(root, dev, log)
        gpus.append(GpuInfo(name or "", vram, "AMD", source="sysfs"))
    if any(not g.name for g in gpus):
        names = _rocm_smi_names(run, which, timeout_s, log)
        for i, gpu in enumerate(gpus):
            if not gpu.name:
                gpu.name = names[i] if len(names) == len(gpus) else _pci_fallback_name(cards[i])
    return gpus


def _rocm_smi_names(run: Runner, which: Which, timeout_s: float, log: Debug) -> list[str]:
    exe = which("rocm-smi")
    if not exe:
        return []
    try:
        out = run([exe, "--showproductname"], timeout_s)
    except Exception as exc:
        log(f"rocm-smi: failed: {exc!r}")
        return []
    names = []
    for line in out.splitlines():
        _, sep, value = line.partition("Card Series:")
        if sep and value.strip():
            names.append(_marketing("AMD", value.strip()))
    return names


def _pci_fallback_name(card: Path) -> str:
    device = (_read(card / "device/device") or "").lower().removeprefix("0x")
    return f"AMD GPU [1002:{device}]" if device else "AMD GPU"


def _intel_sysfs(root: Path, cards: list[Path], log: Debug) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for card in cards:
        dev = card / "device"
        vram = _intel_vram(card)
        slot = _pci_slot(dev)
        if vram is None and slot.endswith("00:02.0"):
            # 00:02.0 is where every Intel integrated GPU sits; it has no memory of its own.
            log(f"sysfs: {card.name} (Intel at {slot}) is integrated; left out")
            continue
        if vram is not None and vram < MIN_DEDICATED_BYTES:
            log(f"sysfs: {card.name} (Intel) has {vram // MIB} MiB local memory; left out")
            continue
        name = _pci_name(root, dev, log)
        if not name:
            device = (_read(dev / "device") or "").lower().removeprefix("0x")
            name = f"Intel GPU [8086:{device}]"
        gpus.append(GpuInfo(name, vram, "Intel", source="sysfs"))
    return gpus


def _intel_vram(card: Path) -> int | None:
    dev = card / "device"
    # xe: one physical_vram_size_bytes per tile (a two-tile Data Center GPU Max has two).
    tiles = [_read_int(t / "physical_vram_size_bytes") for t in sorted(dev.glob("tile*"))]
    if any(tiles):
        return sum(t for t in tiles if t)
    # i915 (with local-memory support): lmem_total_bytes under the card, its device or its first tile/gt.
    for rel in ("lmem_total_bytes", "device/lmem_total_bytes", "device/tile0/lmem_total_bytes"):
        size = _read_int(card / rel)
        if size:
            return size
    for path in sorted(card.glob("gt/gt*/lmem_total_bytes")):
        size = _read_int(path)
        if size:
            return size
    return None


def _pci_slot(dev: Path) -> str:
    for line in (_read(dev / "uevent") or "").splitlines():
        if line.startswith("PCI_SLOT_NAME="):
            return line.split("=", 1)[1].strip()
    return os.path.basename(os.path.realpath(dev))


def _pci_name(root: Path, dev: Path, log: Debug) -> str | None:
    """The marketing name from the PCI ids database: "AMD Radeon RX 7900 XTX", "Intel Arc A770"."""
    vendor = (_read(dev / "vendor") or "").lower().removeprefix("0x")
    device = (_read(dev / "device") or "").lower().removeprefix("0x")
    if not vendor or not device:
        return None
    sub = (
        (_read(dev / "subsystem_vendor") or "").lower().removeprefix("0x"),
        (_read(dev / "subsystem_device") or "").lower().removeprefix("0x"),
    )
    for rel in PCI_IDS:
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        name = lookup_pci_ids(text, vendor, device, sub)
        if name:
            return _marketing(VENDORS.get(vendor, ""), name)
        log(f"pci.ids: no entry for {vendor}:{device} in {path}")
        return None
    log("pci.ids: no PCI ids database (/usr/share/misc/pci.ids, /usr/share/hwdata/pci.ids)")
    return None


def lookup_pci_ids(text: str, vendor: str, device: str, sub: tuple[str, str] = ("", "")) -> str | None:
    """The device's name in pci.ids text; the subsystem's own name when the board is the vendor's own
    (reference boards are named for what they are sold as; partner boards carry partner product names)."""
    start = text.find(f"\n{vendor}  ")
    if start < 0:
        return None
    device_name: str | None = None
    for line in text[start + 1 :].splitlines()[1:]:
        if not line.startswith("\t"):
            if line and not line.startswith("#"):
                break  # the next vendor
            continue
        if line.startswith("\t\t"):
            if device_name is not None and sub[0] == vendor:
                ids, _, name = line.strip().partition("  ")
                if ids.split() == list(sub) and name:
                    return name.strip()
            continue
        if device_name is not None:
            break  # past our device's subsystems
        ids, _, name = line.strip().partition("  ")
        if ids == device:
            device_name = name.strip()
    return device_name


def _marketing(vendor: str, name: str) -> str:
    """ "Navi 31 [Radeon RX 7900 XT/7900 XTX]" -> "AMD Radeon RX 7900 XT/7900 XTX"; "DG2 [Arc A770]" ->
    "Intel Arc A770"."""
    bracket = re.search(r"\[([^\]]+)\]\s*$", name)
    if bracket:
        name = bracket.group(1).strip()
    if vendor and not name.lower().startswith(vendor.lower()):
        name = f"{vendor} {name}"
    return name


# -- Apple Silicon -------------------------------------------------------------------------------------


def apple_gpu_budget_bytes(ram_bytes: int, wired_limit_mb: int | None) -> int:
    """Memory the GPU may use on Apple Silicon (unified memory).

    `sysctl iogpu.wired_limit_mb` when the owner set it (> 0); otherwise Metal's default working-set
    share as observed (recommendedMaxWorkingSetSize): about 2/3 of RAM up to 36 GB, 3/4 above
    (16 GB -> 11, 32 GB -> 21, 64 GB -> 48, 192 GB -> 144). An estimate of the default, not a query.
    """
    if wired_limit_mb and wired_limit_mb > 0:
        return wired_limit_mb * MIB
    share = 2 / 3 if ram_bytes <= 36 * GIB else 3 / 4
    return int(ram_bytes * share)


def _apple(sysctl: Sysctl, log: Debug) -> list[GpuInfo]:
    values = sysctl(["machdep.cpu.brand_string", "hw.memsize", "iogpu.wired_limit_mb"])
    brand = values.get("machdep.cpu.brand_string", "").strip()
    if not brand.startswith("Apple"):
        # An Intel Mac's AMD GPU is only visible to IOKit / system_profiler (slow); not probed.
        log(f"apple: {brand or 'no CPU brand'} is not Apple Silicon; no GPU probe")
        return []
    ram = _int(values.get("hw.memsize"))
    wired = _int(values.get("iogpu.wired_limit_mb"))
    if not ram:
        log("apple: hw.memsize unreadable; GPU memory unknown")
        return [GpuInfo(brand, None, "Apple", source="sysctl")]
    return [GpuInfo(brand, apple_gpu_budget_bytes(ram, wired), "Apple", source="sysctl")]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# -- Windows (registry; NVIDIA comes from NVML first) --------------------------------------------------


def _windows_registry(registry: Registry, log: Debug) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for sub in registry.subkeys(DISPLAY_CLASS):
        if not re.fullmatch(r"\d{4}", sub):  # "Properties" and "Configuration" are not adapters
            continue
        path = f"{DISPLAY_CLASS}\\{sub}"
        name = registry.value(path, "DriverDesc")
        device_id = str(registry.value(path, "MatchingDeviceId") or "").lower()
        if not name or not device_id.startswith("pci\\ven_"):
            continue  # Microsoft Basic Display, remote / indirect display drivers: not a GPU
        vendor = VENDORS.get(device_id[8:12], device_id[8:12].upper())
        # qwMemorySize is the 64-bit size; the older MemorySize (DWORD or 4 bytes) stops at 4 GiB.
        # WMI's AdapterRAM has the same 4 GiB cap, hence the registry.
        size = registry.value(path, "HardwareInformation.qwMemorySize")
        if size is None:
            size = registry.value(path, "HardwareInformation.MemorySize")
        if isinstance(size, bytes):
            size = int.from_bytes(size[:8], "little")
        vram = size if isinstance(size, int) and size > 0 else None
        if vram is not None and vram < MIN_DEDICATED_BYTES:
            log(f"registry: {name} has {vram // MIB} MiB dedicated: integrated; left out")
            continue
        driver = registry.value(path, "DriverVersion")
        gpus.append(
            GpuInfo(str(name).strip(), vram, vendor, str(driver) if driver else None, source="registry")
        )
    return gpus


# -- GPU use by other processes (--pause-when-busy) ---------------------------------------------------
#
# The owner's own work comes first: while processes other than the shared server use the GPU, the
# participant pauses. "Busy" is judged from NVML, per GPU, on processes whose pid is not the server's:
#   - their SM utilisation (nvmlDeviceGetProcessUtilization samples since the last reading) of at
#     least BUSY_UTIL_PERCENT on any GPU: a training run, a render, a game. Where the driver has no
#     per-process samples (NotSupported: some consumer boards, vGPU), the device's utilisation
#     (nvmlDeviceGetUtilizationRates) counts instead, but only on a GPU where another process runs,
#     so a GPU that only the server uses is never "busy" (the server's own load would then count
#     towards it on such a driver: the price of having no per-process figure);
#   - or their GPU memory (compute and graphics processes, nvmlDeviceGet*RunningProcesses) of at least
#     BUSY_MEMORY_BYTES in all: a loaded model or a game's textures squeeze the server even when idle.
#     A desktop (Xorg, a compositor, a browser) takes 100-500 MiB, hence 1 GiB.
# Hysteresis, so that bursty work (a game's loading screens, a notebook between cells) does not flap:
# busy at once on one reading over the thresholds; free again only after FREE_READINGS readings in a
# row under the lower FREE_* thresholds.
BUSY_UTIL_PERCENT = 20
BUSY_MEMORY_BYTES = 1 * GIB
FREE_UTIL_PERCENT = 10
FREE_MEMORY_BYTES = 512 * MIB
FREE_READINGS = 2


class GpuUnavailable(Exception):
    """No NVIDIA GPU that NVML can read (no library, no driver, no device): busy-ness is unknown."""


class BusyUnknown(Exception):
    """Busy-ness cannot be told this time (say, the server's pids cannot be found while it restarts)."""


@dataclass
class OtherGpuUse:
    """What processes other than the shared server do on this machine's NVIDIA GPUs, in one reading.
    `util_percent` is the highest on any one GPU; `memory_bytes` is summed over all GPUs."""

    util_percent: int
    memory_bytes: int
    pids: list[int]
    util_source: str = "process"  # process | device (the fallback, see above)

    def describe(self) -> str:
        """ "other processes use the GPU: 45% utilisation, 3.2 GiB (pids 1234, 5678)" """
        who = ", ".join(str(p) for p in self.pids[:4]) + (" ..." if len(self.pids) > 4 else "")
        where = f" (pid{'s' if len(self.pids) > 1 else ''} {who})" if self.pids else ""
        return (
            f"other processes use the GPU: {self.util_percent}% utilisation,"
            f" {self.memory_bytes / GIB:.1f} GiB{where}"
        )


def other_gpu_use(
    exclude_pids: Collection[int], nvml: Any, since_us: int = 0, log: Debug | None = None
) -> OtherGpuUse:
    """One reading of the GPU use of every process not in `exclude_pids`, through an NVML that is
    already initialised (`nvml`: the pynvml module or a fake). Raises GpuUnavailable when there is no
    GPU, and pynvml's NVMLError when a call the reading needs fails. `since_us`: per-process samples
    older than this (microseconds since the epoch, NVML's clock) are ignored."""
    say = safe_debug(log)
    count = int(nvml.nvmlDeviceGetCount())
    if count == 0:
        raise GpuUnavailable("NVML sees no GPU")
    excluded = set(exclude_pids)
    top_util = 0
    memory = 0
    pids: set[int] = set()
    source = "process"
    for index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        others: dict[int, int] = {}
        for call in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(nvml, call)(handle)
            except Exception as exc:  # NotSupported for graphics on a compute board: skip that list
                say(f"nvml: GPU {index} {call}: {type(exc).__name__}: {exc}")
                continue
            for proc in procs:
                pid = int(proc.pid)
                if pid in excluded:
                    continue
                used = getattr(proc, "usedGpuMemory", None)
                # None (or NVML's "not available" sentinel, 2**64 - 1) where the driver cannot say
                # (WDDM, some containers): the process is there, its memory unknown.
                size = int(used) if isinstance(used, int) and 0 <= used < 2**63 else 0
                others[pid] = max(others.get(pid, 0), size)
        memory += sum(others.values())
        pids.update(others)
        util, kind = _others_util(nvml, handle, excluded, bool(others), since_us, index, say)
        if kind == "device":
            source = "device"
        top_util = max(top_util, util)
    return OtherGpuUse(top_util, memory, sorted(pids), source)


def _others_util(
    nvml: Any, handle: Any, excluded: set[int], others_present: bool, since_us: int, index: int, say: Debug
) -> tuple[int, str]:
    try:
        samples = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
    except Exception as exc:
        value = getattr(exc, "value", None)
        # NotFound (or pynvml's NVMLError(0) for an empty buffer): no process ran since `since_us`.
        if value in (0, getattr(nvml, "NVML_ERROR_NOT_FOUND", 6)):
            return 0, "process"
        say(f"nvml: GPU {index} per-process utilisation: {type(exc).__name__}: {exc}; device figure used")
        if not others_present:
            return 0, "device"
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu), "device"
    util = 0
    for sample in samples:
        if int(sample.pid) in excluded or int(sample.timeStamp) < since_us:
            continue
        util = max(util, int(sample.smUtil))
    return util, "process"


@dataclass
class BusyReading:
    """One check of --pause-when-busy: `busy` None when it cannot tell (no GPU, an NVML error);
    `reason` says why in words (for a `paused` event, or for the one note that it cannot tell)."""

    busy: bool | None
    reason: str
    use: OtherGpuUse | None = None
    final: bool = False  # busy None for good: there is no GPU to watch (said once, never retried)


class GpuBusyMeter:
    """`check()` -> BusyReading, with the thresholds and hysteresis above. NVML is initialised on the
    first check and kept until `close()` (an init costs ~15 ms: not once per interval). Never raises.

    `exclude_pids()` gives the shared server's pids at each check (a server that restarts changes
    them); `nvml` is pynvml or a fake, imported lazily; `clock_us` is NVML's clock (epoch µs)."""

    def __init__(
        self,
        exclude_pids: Callable[[], Collection[int]],
        nvml: Any = None,
        log: Debug | None = None,
        clock_us: Callable[[], int] | None = None,
    ) -> None:
        self.exclude_pids = exclude_pids
        self._nvml = nvml
        self._log = safe_debug(log)
        self._clock_us = clock_us or _epoch_us
        self._live = False
        self._gone: str | None = None  # why there is no GPU to watch, once known: never retried
        self._busy = False
        self._quiet_readings = 0
        self._since_us = 0

    def check(self) -> BusyReading:
        if self._gone is not None:
            return BusyReading(None, self._gone, final=True)
        try:
            nvml = self._ensure()
            now_us = self._clock_us()
            use = other_gpu_use(self.exclude_pids(), nvml, self._since_us, self._log)
            self._since_us = now_us
        except GpuUnavailable as exc:
            self._gone = f"no NVIDIA GPU to watch ({exc})"
            self.close()
            return BusyReading(None, self._gone, final=True)
        except BusyUnknown as exc:
            return BusyReading(None, str(exc))
        except Exception as exc:  # an NVML call failed (GpuIsLost, Unknown, a timeout): keep the state
            self._log(f"nvml: busy check failed: {type(exc).__name__}: {exc}")
            return BusyReading(None, f"the GPU could not be read ({type(exc).__name__}: {exc})")
        over = use.util_percent >= BUSY_UTIL_PERCENT or use.memory_bytes >= BUSY_MEMORY_BYTES
        under = use.util_percent < FREE_UTIL_PERCENT and use.memory_bytes < FREE_MEMORY_BYTES
        if over:
            self._busy, self._quiet_readings = True, 0
        elif self._busy and under:
            self._quiet_readings += 1
            if self._quiet_readings >= FREE_READINGS:
                self._busy, self._quiet_readings = False, 0
        elif self._busy:
            self._quiet_readings = 0  # between the thresholds: still busy, start counting again
        return BusyReading(self._busy, use.describe(), use)

    def _ensure(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except Exception as exc:
                raise GpuUnavailable(f"pynvml not importable: {exc}") from None
            self._nvml = pynvml
        if not self._live:
            try:
                self._nvml.nvmlInit()
            except Exception as exc:  # LibraryNotFound, DriverNotLoaded, NoPermission ...
                raise GpuUnavailable(f"NVML: {type(exc).__name__}: {exc}") from None
            self._live = True
        return self._nvml

    def close(self) -> None:
        """Shut NVML down if this meter initialised it; checks after this start it again."""
        if self._live:
            self._live = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                self._log(f"nvml: shutdown failed: {exc!r}")


def _epoch_us() -> int:
    import time

    return int(time.time() * 1_000_000)
