"""The one hardware-detection function: what accelerators this process can use, and why others are missing."""

from __future__ import annotations

import importlib
import importlib.util
import platform
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Device:
    device: str  # torch device string
    name: str  # product name
    fingerprint: str  # what the compile cache is keyed by: product, capability, runtime


@dataclass(frozen=True)
class Hardware:
    """What `detect_hardware` found.

    `family` is the best accelerator family found (cuda, rocm, npu, mlu or cpu), `device` the torch device
    to run on, `fingerprint` what the compile cache is keyed by (product, compute capability, runtime).
    `missing` maps every family that is not usable to the reason, so an explicit request can name it.
    """

    family: str
    devices: dict[str, Device]  # every usable family (cpu always) → its device
    missing: dict[str, str] = field(default_factory=dict)
    extras: dict[str, bool] = field(default_factory=dict)  # optional compilers: tensorrt, torchair

    def usable(self, family: str) -> bool:
        return family in self.devices

    @property
    def best(self) -> Device:
        return self.devices[self.family]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _try_import(module: str) -> tuple[bool, str]:
    if importlib.util.find_spec(module) is None:
        return False, f"the Python package {module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # vendor extensions fail in many ways without their drivers
        return False, f"import {module} failed: {type(e).__name__}: {e}"
    return True, ""


def detect_hardware() -> Hardware:
    """Probe CUDA (NVIDIA), ROCm (AMD, torch.version.hip), Ascend (torch_npu), Cambricon (torch_mlu), CPU."""
    missing: dict[str, str] = {}
    extras: dict[str, bool] = {}
    found: list[tuple[str, str, str, str]] = []  # family, device, name, fingerprint

    gpu_ok = torch.cuda.is_available()
    hip = getattr(torch.version, "hip", None)
    cuda_rt = getattr(torch.version, "cuda", None)
    if gpu_ok:
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        if hip:
            arch = getattr(props, "gcnArchName", "")
            found.append(("rocm", "cuda:0", name, f"rocm|{name}|{arch}|hip{hip}"))
            missing["cuda"] = f"the GPU is AMD ({name}, ROCm {hip}); use backend rocm"
        else:
            found.append(("cuda", "cuda:0", name, f"cuda|{name}|sm{props.major}{props.minor}|cuda{cuda_rt}"))
            missing["rocm"] = f"the GPU is NVIDIA ({name}); torch.version.hip is None"
    else:
        build = f"torch {torch.__version__}" + (
            f" built for CUDA {cuda_rt}" if cuda_rt else " built without CUDA"
        )
        why = f"torch.cuda.is_available() is False ({build}; no GPU visible to this process)"
        missing["cuda"] = why
        missing["rocm"] = (
            why if not hip else f"torch.cuda.is_available() is False (ROCm {hip} build; no AMD GPU)"
        )
    if "cuda" not in missing:
        extras["tensorrt"], why = _try_import("torch_tensorrt")
        if not extras["tensorrt"]:
            missing["tensorrt"] = why
    else:
        missing["tensorrt"] = f"needs an NVIDIA GPU: {missing['cuda']}"

    for family, module, attr in (("npu", "torch_npu", "npu"), ("mlu", "torch_mlu", "mlu")):
        ok, why = _try_import(module)
        if not ok:
            missing[family] = why
            continue
        dev = getattr(torch, attr, None)
        if dev is None or not dev.is_available():
            missing[family] = f"{module} is installed but torch.{attr}.is_available() is False (no device)"
            continue
        name = str(dev.get_device_name(0))
        found.append((family, f"{attr}:0", name, f"{family}|{name}|{module}"))
    if "npu" not in missing:
        extras["torchair"], _ = _try_import("torchair")

    cpu = _cpu_name()
    devices = {
        "cpu": Device("cpu", cpu, f"cpu|{cpu}|{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}")
    }
    for fam, dev_str, dev_name, fp in found:
        devices[fam] = Device(dev_str, dev_name, fp)
    # preference when several are present: the vendor accelerators, then the GPU, then the CPU
    order = {"npu": 0, "mlu": 1, "rocm": 2, "cuda": 3}
    found.sort(key=lambda f: order[f[0]])
    return Hardware(found[0][0] if found else "cpu", devices, missing, extras)
