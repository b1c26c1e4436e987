"""The rewrite engine: module graph, meta trace, the pass contract, the pass manager, the
report and the memory estimate. It knows nothing about any particular pass."""

from .contract import (Applied, Decision, Engine, Handoff, KeyMap, MemoryEffect, Pass,
                       PassContext)
from .env import Env
from .graph import ModuleGraph
from .manager import PassManager, register_pass
from .report import MemoryEstimate, PassRecord, Report
from .trace import Trace, trace_model

__all__ = ["ModuleGraph", "Pass", "PassContext", "Decision", "Applied", "Handoff", "Engine",
           "KeyMap", "MemoryEffect", "Env", "PassManager", "register_pass", "MemoryEstimate",
           "PassRecord", "Report", "Trace", "trace_model"]
