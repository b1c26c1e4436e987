"""overdrive: make a plain PyTorch model fast and distributed with one call.

    import overdrive as od
    rt = od.accelerate(model, plan="fsdp+compile", optimizer=lambda p: torch.optim.AdamW(p))
    print(rt.report)
"""

from .api import accelerate, inspect
from .errors import (BackendUnavailable, CheckpointCorrupt, CheckpointError,
                     CheckpointMismatch, NotACheckpoint, OverdriveError, PassFailed, PlanError)
from .launch import LaunchError, launch
from .rewrite.graph import ModuleGraph
from .rewrite.contract import Applied, Decision, KeyMap, MemoryEffect, Pass, PassContext
from .rewrite.manager import register_pass
from .plan import (DDP, FP8, FSDP, PRESETS, Casting, Checkpointing, Compile,
                           DeepSpeed, Parallel, Plan)
from .rewrite.report import MemoryEstimate, PassRecord, Report
from .runtime.export import load_weights
from .runtime.helpers import find_executable_batch_size
from .runtime.runtime import Runtime
from .runtime.tracking import Tracker

__version__ = "0.1.0"

__all__ = [
    "accelerate", "inspect",
    "Plan", "Compile", "FP8", "Checkpointing", "Casting", "Parallel", "FSDP", "DDP",
    "DeepSpeed", "PRESETS",
    "Runtime", "Report", "PassRecord", "MemoryEstimate", "ModuleGraph",
    "Pass", "register_pass", "PassContext", "Decision", "Applied", "MemoryEffect", "KeyMap",
    "find_executable_batch_size",
    "OverdriveError", "PlanError", "BackendUnavailable", "PassFailed",
    "load_weights", "CheckpointError", "NotACheckpoint", "CheckpointMismatch", "CheckpointCorrupt",
    "Tracker", "launch", "LaunchError",
]
