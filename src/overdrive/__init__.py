"""overdrive: make a plain PyTorch model fast and distributed with one call.

    import overdrive as od
    rt = od.accelerate(model, plan="fsdp+compile", optimizer=lambda p: torch.optim.AdamW(p))
    print(rt.report)

The public names are imported on first use (PEP 562), so ``import overdrive`` — and the
``overdrive`` command's ``--help`` — does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS: dict[str, str] = {
    "accelerate": ".api", "inspect": ".api",
    **dict.fromkeys(("BackendUnavailable", "CheckpointCorrupt", "CheckpointError",
                     "CheckpointMismatch", "DesyncError", "NonFiniteError", "NotACheckpoint",
                     "OverdriveError", "PassFailed", "PlanError"), ".errors"),
    "ModuleGraph": ".rewrite.graph",
    "register_pass": ".rewrite.manager",
    **dict.fromkeys(("Applied", "Decision", "KeyMap", "MemoryEffect", "Pass", "PassContext"),
                    ".rewrite.contract"),
    **dict.fromkeys(("DDP", "FP8", "FSDP", "PRESETS", "Casting", "Checkpointing", "Compile",
                     "DeepSpeed", "Offload", "Parallel", "Pipeline", "Plan"), ".plan_spec"),
    **dict.fromkeys(("MemoryEstimate", "PassRecord", "Report"), ".rewrite.report"),
    "load_weights": ".runtime.export",
    "find_executable_batch_size": ".runtime.helpers",
    "Runtime": ".runtime.runtime",
    "Tracker": ".runtime.tracking",
    "launch": ".spawn", "LaunchError": ".spawn",
    "plan": ".planner", "Candidate": ".planner", "Hardware": ".planner",
}

__all__ = [
    "accelerate", "inspect",
    "Plan", "Compile", "FP8", "Checkpointing", "Casting", "Parallel", "FSDP", "DDP",
    "DeepSpeed", "Offload", "Pipeline", "PRESETS",
    "Runtime", "Report", "PassRecord", "MemoryEstimate", "ModuleGraph",
    "Pass", "register_pass", "PassContext", "Decision", "Applied", "MemoryEffect", "KeyMap",
    "find_executable_batch_size",
    "OverdriveError", "PlanError", "BackendUnavailable", "PassFailed",
    "load_weights", "CheckpointError", "NotACheckpoint", "CheckpointMismatch", "CheckpointCorrupt",
    "Tracker", "launch", "LaunchError", "DesyncError", "NonFiniteError",
    "plan", "Candidate", "Hardware",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'overdrive' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import accelerate, inspect
    from .errors import (BackendUnavailable, CheckpointCorrupt, CheckpointError,
                         CheckpointMismatch, DesyncError, NonFiniteError, NotACheckpoint,
                         OverdriveError, PassFailed, PlanError)
    from .rewrite.graph import ModuleGraph
    from .rewrite.contract import Applied, Decision, KeyMap, MemoryEffect, Pass, PassContext
    from .rewrite.manager import register_pass
    from .plan_spec import (DDP, FP8, FSDP, PRESETS, Casting, Checkpointing, Compile,
                       DeepSpeed, Offload, Parallel, Pipeline, Plan)
    from .rewrite.report import MemoryEstimate, PassRecord, Report
    from .runtime.export import load_weights
    from .runtime.helpers import find_executable_batch_size
    from .runtime.runtime import Runtime
    from .runtime.tracking import Tracker
    from .spawn import LaunchError, launch
    from .planner import Candidate, Hardware, plan
