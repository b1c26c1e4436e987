"""Accelerator specs the planner costs a layout against: a small table of published
numbers (vendor datasheets, dense peaks) and ``Hardware`` for anything else.

``efficiency`` is the fraction of the dense peak a well-tuned eager transformer step
reaches on the matmuls (torchtitan's published MFU on H100 / A100 is 0.33-0.58; see
docs/planner.md for the calibration); ``alpha`` is the per-hop latency of a collective.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import PlanError

GiB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its interconnect. ``flops``: dense peak FLOP/s per dtype
    ("bf16", "fp8", "fp32"); bandwidths in bytes/s per GPU and direction."""

    flops: Mapping[str, float]
    hbm_bw: float
    intra_node_bw: float
    inter_node_bw: float
    gpus_per_node: int = 8
    memory: int | None = None  # bytes per device, the default memory_per_rank
    efficiency: float = 0.45
    alpha: float = 10e-6  # seconds per ring hop
    name: str = "custom"
    foreach_optimizer: bool = True  # the optimizer runs multi-tensor (GPU default)
    notes: tuple[str, ...] = field(default=())

    @property
    def has_fp8(self) -> bool:
        return "fp8" in self.flops

    def peak(self, dtype: str) -> float:
        return self.flops.get(dtype) or self.flops.get("bf16") or max(self.flops.values())


_T = 1e12
_G = 1e9

# dense peaks; NVLink / Infinity Fabric per direction; inter-node: one 400 Gb/s NIC per GPU
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware(name="h100", flops={"bf16": 989 * _T, "fp8": 1979 * _T, "fp32": 67 * _T},
                     hbm_bw=3.35e12, intra_node_bw=450 * _G, inter_node_bw=50 * _G,
                     memory=80 * GiB),
    "h200": Hardware(name="h200", flops={"bf16": 989 * _T, "fp8": 1979 * _T, "fp32": 67 * _T},
                     hbm_bw=4.8e12, intra_node_bw=450 * _G, inter_node_bw=50 * _G,
                     memory=141 * 10 ** 9),
    "a100-80g": Hardware(name="a100-80g", flops={"bf16": 312 * _T, "fp32": 19.5 * _T},
                         hbm_bw=2.039e12, intra_node_bw=300 * _G, inter_node_bw=25 * _G,
                         memory=80 * GiB),
    "b200": Hardware(name="b200", flops={"bf16": 2250 * _T, "fp8": 4500 * _T, "fp32": 80 * _T},
                     hbm_bw=8e12, intra_node_bw=900 * _G, inter_node_bw=50 * _G,
                     memory=180 * 10 ** 9),
    "mi300x": Hardware(name="mi300x", flops={"bf16": 1307 * _T, "fp8": 2615 * _T,
                                             "fp32": 163 * _T},
                       hbm_bw=5.3e12, intra_node_bw=448 * _G, inter_node_bw=50 * _G,
                       memory=192 * 10 ** 9),
    # a CPU host (the gloo tests): fp32 only, loopback "interconnect"; memory from the caller
    "cpu": Hardware(name="cpu", flops={"fp32": 0.1 * _T}, hbm_bw=20 * _G,
                    intra_node_bw=5 * _G, inter_node_bw=5 * _G, gpus_per_node=1 << 20,
                    efficiency=0.5, alpha=50e-6, foreach_optimizer=False),
}


def resolve_hardware(hardware: str | Hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(hardware, str) and hardware.lower() in HARDWARE:
        return HARDWARE[hardware.lower()]
    raise PlanError(f"hardware={hardware!r} is not known; give one of "
                    f"{', '.join(HARDWARE)} or an od.Hardware(flops=..., hbm_bw=..., "
                    "intra_node_bw=..., inter_node_bw=..., gpus_per_node=...)")


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value: int | float | str, name: str = "memory_per_rank") -> int:
    """``80 * 2**30``, ``"80GiB"``, ``"80 GB"`` → bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise PlanError(f"{name}={value!r} is not a size; give bytes (an int > 0) or a string "
                    "such as '80GiB' or '40GB'")
