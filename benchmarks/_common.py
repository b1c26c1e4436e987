"""Shared by the benchmark scripts: machine description, device, throughput, JSON output.

Every script prints one JSON object and writes it to benchmarks/results/<name>.json with
a ``targets`` list — ``{"name", "value", "target", "met"}`` rows — that
``benchmarks/report.py`` turns into the table of benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

# CPU features that change the numbers a lot: bf16 matmuls are emulated (~20x slower)
# without AVX-512 BF16 / AMX, which makes fp8 and casting ratios machine-specific.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the CPU_FLAGS present) from /proc/cpuinfo where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    first = info.split("\n\n", 1)[0]  # the first processor's block
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [f for f in CPU_FLAGS if f in flags]


def machine() -> dict:
    import torch

    cpu, flags = cpu_description()
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device():
    """The benchmark's device: the first GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_flops(dev, dtype: str = "bf16") -> float | None:
    """The device's dense peak FLOP/s for ``dtype``, or None (CPUs, unknown GPUs): the
    library's own table (overdrive.runtime.peaks), so MFU here and in rt.log agree."""
    from overdrive.runtime.peaks import peak_flops as library_peak

    return library_peak(dev, dtype)


def step_flops(model, example_inputs) -> int:
    """Forward + backward FLOPs of one step, from overdrive's meta-device trace."""
    from overdrive.rewrite.trace import trace_model

    trace = trace_model(model, example_inputs)
    return trace.forward_flops + trace.backward_flops


def throughput(tokens: int, seconds: float, flops: int | None, dev,
               dtype: str = "bf16") -> dict:
    """tokens/s, achieved TFLOP/s and MFU (None where the device's peak is unknown)."""
    peak = peak_flops(dev, dtype)
    achieved = flops / seconds if flops and seconds else None
    return {"tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "tflops": round(achieved / 1e12, 3) if achieved else None,
            "mfu": round(achieved / peak, 4) if achieved and peak else None}


def target(name: str, value: float | None, limit: float | None, op: str = "<=") -> dict:
    """One row of a result's ``targets``: ``value op limit`` (None: could not be measured)."""
    checks = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
              ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}
    met = None if value is None or limit is None else bool(checks[op](value, limit))
    return {"name": name, "value": None if value is None else round(float(value), 4),
            "target": f"{op} {limit}", "met": met}


def emit(name: str, result: dict, out: Path | None = None) -> None:
    """Print one JSON object and write it to ``out`` (default benchmarks/results/<name>.json)."""
    result = {"benchmark": name, "machine": machine(), **result}
    text = json.dumps(result, indent=2, default=str)
    out = Path(out) if out is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
