"""Accelerator placement: which extended resource, tolerations and node labels an accelerator spec means.

The one place that maps vendors to Kubernetes resource names and node labels (GPU feature discovery for
NVIDIA,
the AMD GPU operator's labeller, the Ascend and Cambricon device plugins). hack/fleet.yaml follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crds.common import Accelerator, Resources


@dataclass(frozen=True)
class Vendor:
    resource: str  # extended resource requested by pods
    product_label: str  # node label holding the product name


VENDORS: dict[str, Vendor] = {
    "nvidia": Vendor("nvidia.com/gpu", "nvidia.com/gpu.product"),
    "amd": Vendor("amd.com/gpu", "amd.com/gpu.product-name"),
    "ascend": Vendor("huawei.com/Ascend910", "huawei.com/npu.product"),
    "cambricon": Vendor("cambricon.com/mlu", "cambricon.com/mlu.model"),
}


@dataclass(frozen=True)
class Placement:
    resources: dict[str, str]
    tolerations: list[dict[str, Any]]
    node_selector: dict[str, str]


def placement(acc: Accelerator) -> Placement:
    """Resources, tolerations and node selector for pods that need `acc`."""
    vendor = VENDORS.get(str(acc.vendor))
    if vendor is None or acc.count == 0:
        return Placement({}, [], {})
    return Placement(
        resources={vendor.resource: str(acc.count)},
        tolerations=[{"key": vendor.resource, "operator": "Exists", "effect": "NoSchedule"}],
        node_selector={vendor.product_label: acc.product} if acc.product else {},
    )


def pod_resources(resources: Resources | None, acc: Accelerator) -> dict[str, Any]:
    """A container's `resources`: the spec's CPU and memory, and the accelerators (extended resources, so
    their requests equal their limits)."""
    out: dict[str, Any] = {}
    for kind in ("requests", "limits"):
        rl = getattr(resources, kind) if resources else None
        values = {k: v for k, v in (rl.to_wire() if rl else {}).items() if v is not None}
        if values:
            out[kind] = values
    accel = placement(acc).resources
    if accel:
        out["limits"] = {**out.get("limits", {}), **accel}
        out["requests"] = {**out.get("requests", {}), **accel}
    return out
