"""A layout run through the real passes' ``check`` on the meta model, and what the cost
model reads from their decisions: each pass's MemoryEffect, FSDP's units, TP's styles,
the recomputed blocks, the parameters' per-rank shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..passes.checkpointing import CheckpointingDecision
from ..passes.ddp import DDPDecision
from ..passes.fsdp import FSDPDecision
from ..passes.tensor_parallel import TensorParallelDecision
from ..plan_spec import Plan
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import PassManager
from ..runtime.state import make_env

# which dim of a weight a TP style splits (torch's Colwise/RowwiseParallel)
_TP_WEIGHT_DIM = {"colwise": 0, "colwise_rep": 0, "embedding_rowwise": 0,
                  "rowwise": 1, "rowwise_rep": 1}


@dataclass
class Param:
    name: str
    module: str
    shape: tuple[int, ...]  # this rank's shape after TP (before FSDP)
    element_size: int
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checked:
    """The decisions of every pass for one plan, and the facts read from them."""

    plan: Plan
    decisions: list
    graph: ModuleGraph
    params: list[Param] = field(default_factory=list)
    # facts that do not depend on the recompute mode, shared by a layout's variants
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def effects(self) -> list:
        return [d.memory for d in self.decisions if d.memory is not None]

    def find(self, kind: type):
        return next((d for d in self.decisions if isinstance(d, kind)), None)

    @property
    def fsdp(self) -> FSDPDecision | None:
        return self.find(FSDPDecision)

    @property
    def ddp(self) -> DDPDecision | None:
        """DDP's decision when it all-reduces (more than one data rank)."""
        d = self.find(DDPDecision)
        return d if d is not None and d.modules else None

    @property
    def tp(self) -> TensorParallelDecision | None:
        return self.find(TensorParallelDecision)

    @property
    def recomputed(self) -> tuple[str, ...]:
        d = self.find(CheckpointingDecision)
        return () if d is None or d.memory is None else d.memory.checkpointed

    def units(self) -> list[list[Param]]:
        """FSDP's units in order (the root last), each with the parameters it owns."""
        fsdp = self.fsdp
        if fsdp is None:
            return []
        if "units" not in self.cache:
            groups = [[] for _ in fsdp.units]
            owner: dict[str, int] = {}
            for p in self.params:
                if p.module not in owner:
                    owner[p.module] = _unit_of(p.module, fsdp.units)
                groups[owner[p.module]].append(p)
            self.cache["units"] = groups
        return self.cache["units"]


def _unit_of(module: str, units: list[list[str]]) -> int:
    for i, unit in enumerate(units[:-1]):
        if any(module == m or module.startswith(m + ".") for m in unit):
            return i
    return len(units) - 1


def check_plan(shadow: nn.Module, plan: Plan, world_size: int,
               graph: ModuleGraph | None = None) -> Checked:
    """Every pass's ``check`` for ``plan`` on the meta ``shadow`` (a PlanError /
    BackendUnavailable propagates: the layout is impossible). ``graph``: the shadow's
    ModuleGraph, shared between checks (checks only read it)."""
    plan, env = make_env(plan, world_size=world_size, dry_run=True)
    env.model_on_meta = True
    graph = graph if graph is not None else ModuleGraph(shadow, plan.blocks)
    graph.blocks()
    decisions = PassManager(plan).check_all(graph, env)
    checked = Checked(plan=plan, decisions=decisions, graph=graph)
    checked.params = _params(shadow, checked.tp)
    return checked


def _params(model: nn.Module, tp: TensorParallelDecision | None) -> list[Param]:
    styles = tp.styles if tp is not None else {}
    out = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            shape = list(p.shape)
            style = styles.get(mod_name)
            if style in _TP_WEIGHT_DIM and tp is not None:
                dim = _TP_WEIGHT_DIM[style] if p.ndim > 1 else (0 if style == "colwise" else None)
                if dim is not None and dim < len(shape):
                    shape[dim] = math.ceil(shape[dim] / tp.tp)
            out.append(Param(f"{mod_name}.{pname}" if mod_name else pname, mod_name,
                             tuple(shape), p.element_size(), p.requires_grad))
    return out
