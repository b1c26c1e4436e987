"""PassManager: the registry, ordering by topological sort, check-all-then-apply.

A pass declares which passes it runs ``after`` and ``before``. The manager keeps the
enabled passes, builds a DiGraph of those constraints and takes a deterministic
topological order (ties broken by registration order, which is the canonical order for
the built-ins). Every pass's ``check`` runs before any ``apply``: a refused plan leaves
the model untouched.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx
from torch import nn

from ..errors import PassFailed, PlanError
from .estimate import parameter_bytes_per_rank
from .graph import ModuleGraph, tensor_bytes
from .plan import Plan
from .report import PassRecord


class Pass:
    """One transformation. Subclass it and register it with ``@register_pass``.

    ``enabled(plan)`` says whether the plan asks for it; ``check(graph, plan, env)`` raises
    ``PlanError`` / ``BackendUnavailable`` for anything it cannot do and must not mutate;
    ``apply(model, graph, plan, env)`` does the work and returns a ``PassRecord``;
    ``preview(graph, plan, env)`` is the dry-run account used by ``od.inspect``.
    """

    name: str = ""
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    # True when apply replaces nn.Parameter objects (sharding, wrapping engines):
    # an optimizer built beforehand would then point at stale tensors.
    replaces_parameters: bool = False

    def enabled(self, plan: Plan) -> bool:
        return True

    def check(self, graph: ModuleGraph, plan: Plan, env: Any) -> None:
        return None

    def apply(self, model: nn.Module, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        raise NotImplementedError(f"pass {self.name!r} has no apply()")

    def preview(self, graph: ModuleGraph, plan: Plan, env: Any) -> PassRecord:
        return PassRecord(self.name, dry_run=True)

    def record(self, **kwargs: Any) -> PassRecord:
        return PassRecord(self.name, **kwargs)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


@dataclass
class _Entry:
    cls: type[Pass]
    after: tuple[str, ...]
    before: tuple[str, ...]
    requires: tuple[str, ...]
    index: int  # registration order: the tie-breaker of the topological sort


_REGISTRY: dict[str, _Entry] = {}


def _builtins_first() -> None:
    """Register the built-in passes before anything else: their registration order is the
    canonical tie-breaker, whoever reaches the registry first (``import overdrive`` no
    longer imports them, to keep the package import light)."""
    importlib.import_module("overdrive.passes")  # a no-op once imported (or importing)


def register_pass(name: str, after: tuple[str, ...] | str = (), before: tuple[str, ...] | str = (),
                  requires: tuple[str, ...] | str = ()) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: add a ``Pass`` subclass to the pipeline under ``name``.

    ``after`` / ``before`` name passes this one must follow / precede when both are
    enabled; ``requires`` names passes that must be enabled whenever this one is.
    """

    _builtins_first()

    def as_tuple(v):
        return (v,) if isinstance(v, str) else tuple(v)

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"register_pass({name!r}) decorates a subclass of od.Pass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name].cls is not cls \
                and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise PlanError(f"a pass named {name!r} is already registered "
                            f"({_REGISTRY[name].cls.__qualname__}); choose another name")
        cls.name = name
        cls.after, cls.before, cls.requires = as_tuple(after), as_tuple(before), as_tuple(requires)
        index = _REGISTRY[name].index if name in _REGISTRY else len(_REGISTRY)
        _REGISTRY[name] = _Entry(cls, cls.after, cls.before, cls.requires, index)
        return cls

    return decorate


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_passes() -> list[str]:
    _builtins_first()
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n].index)


def order_passes(plan: Plan) -> list[Pass]:
    """The enabled passes in a valid, deterministic order."""
    _builtins_first()
    instances = {name: e.cls() for name, e in _REGISTRY.items()}
    enabled = {name: p for name, p in instances.items() if p.enabled(plan)}
    for name in plan.requested_passes():
        if name not in enabled:
            why = "is not registered" if name not in _REGISTRY else "did not enable itself"
            raise PlanError(f"the plan asks for pass '{name}', which {why}; "
                            f"registered passes: {', '.join(registered_passes()) or 'none'}")
    g = nx.DiGraph()
    g.add_nodes_from(enabled)
    for name, p in enabled.items():
        for dep in p.requires:
            if dep not in enabled:
                why = "is not registered" if dep not in _REGISTRY else "is not enabled by the plan"
                raise PlanError(f"pass '{name}' requires pass '{dep}', which {why}")
        for other in p.after + p.before:
            if other not in _REGISTRY:
                raise PlanError(
                    f"pass '{name}' is ordered relative to pass '{other}', which is not "
                    f"registered; registered passes: {', '.join(registered_passes())}"
                )
        for other in p.after:
            if other in enabled:
                g.add_edge(other, name)
        for other in p.before:
            if other in enabled:
                g.add_edge(name, other)
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: _REGISTRY[n].index))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        path = " → ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise PlanError(f"pass ordering has a cycle: {path}; fix their after=/before=") from None
    return [enabled[n] for n in order]


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (DTensor shards count locally)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_bytes(p)
    return total


def _module_state(m: nn.Module) -> tuple:
    """What a pass may change on one module in place: its class, an instance-level
    forward (checkpointing, autocast), the compiled call (``module.compile``), its own
    parameters (objects, dtypes, devices) and its hooks (fully_shard, replicate)."""
    params = tuple((n, id(p), p.dtype, p.device) for n, p in m._parameters.items()
                   if p is not None)
    return (id(m), type(m), m.__dict__.get("forward"), m.__dict__.get("_compiled_call_impl"),
            params, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))


def _module_snapshot(model: nn.Module) -> dict[str, tuple]:
    return {n: _module_state(m) for n, m in model.named_modules()}


def _changed_modules(before: dict[str, tuple], model: nn.Module) -> list[str]:
    """Modules replaced, added, removed or changed in place since ``before``."""
    after = _module_snapshot(model)
    changed = [n for n, v in after.items() if before.get(n) != v]
    changed += [n for n in before if n not in after]
    return changed


class PassManager:
    """Orders, checks and applies the passes a plan enables."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.passes = order_passes(plan)

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def check_all(self, graph: ModuleGraph, env: Any) -> None:
        for p in self.passes:
            p.check(graph, self.plan, env)

    def preview_all(self, graph: ModuleGraph, env: Any) -> list[PassRecord]:
        """Every pass's dry-run record; parameter bytes per rank before/after each pass are
        estimated from the graph and the records so far (casting's storage dtype, TP and
        FSDP / ZeRO-3 shards)."""
        records: list[PassRecord] = []
        for p in self.passes:
            rec = p.preview(graph, self.plan, env)
            rec.name, rec.dry_run = p.name, True
            rec.bytes_before = parameter_bytes_per_rank(graph, self.plan, records)
            records.append(rec)
            rec.bytes_after = parameter_bytes_per_rank(graph, self.plan, records)
        return records

    def apply_all(self, model: nn.Module, graph: ModuleGraph, env: Any) -> list[PassRecord]:
        """Apply in order, in place on ``model``; one record per pass.

        The blocks are resolved once, from the model as it was: a pass that converts
        only some blocks (fp8 with a filter, casting) leaves them structurally different,
        and re-detecting them would hand the later passes (checkpointing, compile, fsdp)
        a subset. Each later pass sees a fresh graph of the transformed model with the
        same blocks, as ``od.inspect`` previews them.
        """
        blocks = tuple(graph.blocks())
        records: list[PassRecord] = []
        for p in self.passes:
            before = _module_snapshot(model)
            bytes_before = parameter_bytes(model)
            t0 = time.perf_counter()
            try:
                rec = p.apply(model, graph, self.plan, env)
            except Exception as err:  # noqa: BLE001 - re-raised with the pass named
                # the model may be partly transformed, whatever was raised (a PlanError
                # too): say so, name the pass and what it touched; the cause is kept
                raise PassFailed(p.name, _changed_modules(before, model), err) from err
            if rec is None:
                rec = PassRecord(p.name)
            rec.name = p.name
            rec.seconds = time.perf_counter() - t0
            rec.bytes_before = bytes_before
            rec.bytes_after = parameter_bytes(model)
            records.append(rec)
            graph = ModuleGraph(model, blocks)
        return records
