"""PassManager: the registry keyed by config type, ordering, check-all-then-apply.

A pass is registered for one config type; it runs exactly when the plan holds an instance
of that type (``plan.configs()``). Among the passes that run, ``after`` / ``before`` names
build a DiGraph of constraints and the manager takes a deterministic topological order
(ties broken by registration order, which is the canonical order for the built-ins).
Every pass's ``check`` runs before any ``apply``: a refused plan leaves the model
untouched. The decisions ``check`` returns are what ``preview`` renders and ``apply`` does.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx
from torch import nn

from ..errors import PassFailed, PlanError
from .contract import Applied, Decision, Handoff, Pass, PassContext
from .env import Env
from .estimate import parameter_bytes_per_rank
from .graph import ModuleGraph, tensor_bytes
from .report import PassRecord


@dataclass
class _Entry:
    cls: type[Pass]
    config: type
    index: int  # registration order: the tie-breaker of the topological sort


_REGISTRY: dict[str, _Entry] = {}  # by pass name


def _builtins_first() -> None:
    """Register the built-in passes before anything else: their registration order is the
    canonical tie-breaker, whoever reaches the registry first (``import overdrive`` no
    longer imports them, to keep the package import light)."""
    importlib.import_module("overdrive.passes")  # a no-op once imported (or importing)
def _as_tuple(v) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


def register_pass(name: str, after: tuple[str, ...] | str = (), before: tuple[str, ...] | str = (),
                  requires: tuple[str, ...] | str = (), *, config: type | None = None
                  ) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: add a ``Pass`` subclass to the registry under ``name``, keyed by
    ``config`` (a dataclass type; or the class's ``config`` attribute).

    The pass runs exactly when the plan holds a ``config`` instance (user configs go in
    ``od.Plan(extra=(MyConfig(...),))``). ``after`` / ``before`` name passes this one must
    follow / precede when both run; ``requires`` names passes that must run with it.
    """

    _builtins_first()

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"register_pass({name!r}) decorates a subclass of od.Pass, got {cls!r}")
        key = config if config is not None else cls.__dict__.get("config")
        if not isinstance(key, type):
            raise TypeError(
                f"register_pass({name!r}) needs config=<a dataclass type>: a pass runs exactly "
                "when the plan holds its config, e.g. od.Plan(extra=(MyPassConfig(),))")
        if "enabled" in vars(cls):
            raise TypeError(
                f"pass {name!r} defines enabled(plan), which no longer decides anything: the "
                f"pass runs exactly when the plan holds a {key.__name__}; drop enabled()")
        old = _REGISTRY.get(name)
        if old is not None and old.cls is not cls and old.cls.__qualname__ != cls.__qualname__:
            raise PlanError(f"a pass named {name!r} is already registered "
                            f"({old.cls.__qualname__}); choose another name")
        clash = [n for n, e in _REGISTRY.items() if e.config is key and n != name]
        if clash:
            raise PlanError(f"config {key.__name__} already keys pass {clash[0]!r}; give pass "
                            f"{name!r} its own config type")
        cls.name, cls.config = name, key
        cls.after, cls.before, cls.requires = _as_tuple(after), _as_tuple(before), _as_tuple(requires)
        _REGISTRY[name] = _Entry(cls, key, old.index if old else len(_REGISTRY))
        return cls

    return decorate


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_passes() -> list[str]:
    _builtins_first()
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n].index)


def _pass_for(cfg: Any) -> str:
    for name, e in _REGISTRY.items():
        if type(cfg) is e.config:
            return name
    raise PlanError(
        f"the plan holds {type(cfg).__name__}(...), but no pass is registered for "
        f"{type(cfg).__name__}; register one with @od.register_pass(name, "
        f"config={type(cfg).__name__}); registered passes: {', '.join(registered_passes())}")


def order_passes(plan: Any) -> list[tuple[Pass, Any]]:
    """(pass, its config) for every config in the plan, in a valid, deterministic order."""
    _builtins_first()
    chosen: dict[str, Any] = {}
    for cfg in plan.configs():
        name = _pass_for(cfg)
        if name in chosen:
            raise PlanError(f"the plan holds two {type(cfg).__name__} configs; give one")
        chosen[name] = cfg
    instances = {name: _REGISTRY[name].cls() for name in chosen}
    g = nx.DiGraph()
    g.add_nodes_from(chosen)
    for name, p in instances.items():
        for dep in p.requires:
            if dep not in chosen:
                why = ("is not registered" if dep not in _REGISTRY else
                       f"does not run: the plan holds no {_REGISTRY[dep].config.__name__}")
                raise PlanError(f"pass '{name}' requires pass '{dep}', which {why}")
        for other in p.after + p.before:
            if other not in _REGISTRY:
                raise PlanError(
                    f"pass '{name}' is ordered relative to pass '{other}', which is not "
                    f"registered; registered passes: {', '.join(registered_passes())}"
                )
        g.add_edges_from((other, name) for other in p.after if other in chosen)
        g.add_edges_from((name, other) for other in p.before if other in chosen)
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: _REGISTRY[n].index))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        path = " → ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise PlanError(f"pass ordering has a cycle: {path}; fix their after=/before=") from None
    return [(instances[n], chosen[n]) for n in order]


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
    forward (a wrapped forward), the compiled call (``module.compile()``), its own
    parameters (objects, dtypes, devices) and its hooks (sharding, replication)."""
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
    """Orders, checks and applies the passes a plan's configs select."""

    def __init__(self, plan: Any):
        self.plan = plan
        self._ordered = order_passes(plan)
        self.passes = [p for p, _ in self._ordered]

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _contexts(self, graph: ModuleGraph, env: Env) -> list[PassContext]:
        return [PassContext(cfg, graph, self.plan, env) for _, cfg in self._ordered]

    def check_all(self, graph: ModuleGraph, env: Env) -> list[Decision]:
        """Every pass's decision, in order; nothing is mutated."""
        decisions = []
        for p, ctx in zip(self.passes, self._contexts(graph, env)):
            decision = p.check(ctx)
            if not isinstance(decision, Decision):
                raise TypeError(f"pass {p.name!r}: check() returned {decision!r}; it returns "
                                "an od.Decision (what apply will do)")
            decisions.append(decision)
        return decisions

    def preview_all(self, graph: ModuleGraph, env: Env,
                    decisions: list[Decision]) -> list[PassRecord]:
        """Every pass's dry-run record; parameter bytes per rank before/after each pass are
        estimated from the graph and the decisions' memory effects so far."""
        records: list[PassRecord] = []
        effects = []
        for p, ctx, d in zip(self.passes, self._contexts(graph, env), decisions):
            rec = p.preview(d, ctx)
            rec.name, rec.dry_run = p.name, True
            rec.bytes_before = parameter_bytes_per_rank(graph, effects)
            if d.memory is not None:
                effects.append(d.memory)
            rec.bytes_after = parameter_bytes_per_rank(graph, effects)
            records.append(rec)
        return records

    def apply_all(self, model: nn.Module, graph: ModuleGraph, env: Env,
                  decisions: list[Decision]) -> tuple[list[PassRecord], Handoff]:
        """Apply each decision in order, in place on ``model``; one record per pass and
        everything the passes hand on.

        The blocks are resolved once, from the model as it was: a pass that converts
        only some blocks (a filtered module swap) leaves them structurally different,
        and re-detecting them would hand the later passes a subset. Each later pass sees a
        fresh graph of the transformed model with the same blocks, as ``od.inspect``
        previews them.
        """
        blocks = tuple(graph.blocks())
        records: list[PassRecord] = []
        handoff = Handoff()
        for p, ctx, decision in zip(self.passes, self._contexts(graph, env), decisions):
            ctx = ctx.with_graph(graph)
            before = _module_snapshot(model)
            bytes_before = parameter_bytes(model)
            t0 = time.perf_counter()
            try:
                applied = _as_applied(p, p.apply(model, decision, ctx), decision, ctx)
                handoff.add(p.name, applied)
            except Exception as err:  # noqa: BLE001 - re-raised with the pass named
                # the model may be partly transformed, whatever was raised (a PlanError
                # too): say so, name the pass and what it touched; the cause is kept
                raise PassFailed(p.name, _changed_modules(before, model), err) from err
            rec = applied.record
            rec.name, rec.dry_run = p.name, False
            rec.seconds = time.perf_counter() - t0
            rec.bytes_before = bytes_before
            rec.bytes_after = parameter_bytes(model)
            records.append(rec)
            graph = ModuleGraph(model, blocks)
        return records, handoff


def _as_applied(p: Pass, out: Any, decision: Decision, ctx: PassContext) -> Applied:
    """``apply``'s answer as an ``Applied``: None means "the decision, done"."""
    if isinstance(out, Applied):
        return out
    if isinstance(out, PassRecord):
        return Applied(out)
    if out is None:
        return Applied(p.preview(decision, ctx))
    raise TypeError(f"pass {p.name!r}: apply() returned {type(out).__name__}; return an "
                    "od.Applied (its record and contributions), a PassRecord or None")
