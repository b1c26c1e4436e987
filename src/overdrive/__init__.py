"""overdrive: make a plain PyTorch model fast and distributed with one call.

    import overdrive as od
    rt = od.accelerate(model, plan="fsdp+compile", optimizer=lambda p: torch.optim.AdamW(p))
    print(rt.report)
"""

from .api import accelerate, inspect
from .errors import (BackendUnavailable, CheckpointCorrupt, CheckpointError,
                     CheckpointMismatch, NotACheckpoint, OverdriveError, PassFailed, PlanError)
from .rewrite.graph import ModuleGraph
from .rewrite.manager import Pass, register_pass
from .rewrite.plan import (DDP, FP8, FSDP, PRESETS, Casting, Checkpointing, Compile,
                           DeepSpeed, Offload, Parallel, Plan)
from .rewrite.report import MemoryEstimate, PassRecord, Report
from .runtime.export import load_weights
from .runtime.helpers import find_executable_batch_size
from .runtime.runtime import Runtime

__version__ = "0.1.0"

__all__ = [
    "accelerate", "inspect",
    "Plan", "Compile", "FP8", "Checkpointing", "Casting", "Parallel", "FSDP", "DDP",
    "DeepSpeed", "Offload", "PRESETS",
    "Runtime", "Report", "PassRecord", "MemoryEstimate", "ModuleGraph",
    "Pass", "register_pass", "find_executable_batch_size",
    "OverdriveError", "PlanError", "BackendUnavailable", "PassFailed",
    "load_weights", "CheckpointError", "NotACheckpoint", "CheckpointMismatch", "CheckpointCorrupt",
]
