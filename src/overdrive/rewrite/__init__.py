"""The rewrite engine: module graph, meta trace, plan, pass manager, report.
It knows nothing about any particular pass."""

from .graph import ModuleGraph
from .manager import Pass, PassManager, register_pass
from .plan import Plan, resolve_plan
from .report import MemoryEstimate, PassRecord, Report
from .trace import Trace, trace_model

__all__ = ["ModuleGraph", "Pass", "PassManager", "register_pass", "Plan", "resolve_plan",
           "MemoryEstimate", "PassRecord", "Report", "Trace", "trace_model"]
