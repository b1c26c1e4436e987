"""Dense peak FLOP/s of known accelerators (vendor datasheets, SXM parts), for MFU.

MFU is achieved model FLOP/s over the dense bf16 peak of the device; CPUs and devices not
in the table have no peak, and MFU is then not reported.
"""

from __future__ import annotations

import torch

# peak dense TFLOP/s by device-name fragment and dtype
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "A100": {"bf16": 312.0},
    "L40S": {"bf16": 362.0, "fp8": 733.0},
    "L4": {"bf16": 121.0, "fp8": 242.0},
}


def peak_flops(device: torch.device, dtype: str = "bf16") -> float | None:
    """The device's dense peak FLOP/s for ``dtype``, or None (CPUs, unknown devices)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name and dtype in peaks:
            return peaks[dtype] * 1e12
    return None
