"""The pass contract: what a pass is given, what it decides, what it hands on.

A pass is keyed by its config type (as torchao's ``quantize_`` keys a transformation by its
config): it runs exactly when the plan holds an instance of that type. Three steps::

    decision = pass.check(ctx)             # validate; decide what will be done. No mutation.
    record   = pass.preview(decision, ctx) # what od.inspect shows: the decision, rendered
    applied  = pass.apply(model, decision, ctx)   # do exactly that decision

``apply`` returns an ``Applied``: its ``PassRecord`` and the typed contributions the
runtime consumes (forward contexts, post-step hooks, the gradient-sync switch, an engine
that owns backward/step, a batch transform, state-dict key maps, collective taps). The memory estimate
reads each decision's ``MemoryEffect``. Nothing a pass hands on goes through a field set on
a shared object, and nothing here knows any particular pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from torch import nn

from ..errors import PlanError
from .env import Env
from .graph import ModuleGraph
from .report import PassRecord

ForwardContext = Callable[[], AbstractContextManager]
PostStepHook = Callable[[nn.Module, Any], None]


@dataclass(frozen=True)
class PassContext:
    """What every step of a pass sees: its own config, the module graph of the model as
    the earlier passes left it, the whole plan (other configs, grad_accum…), the world."""

    cfg: Any
    graph: ModuleGraph
    plan: Any
    env: Env

    def with_graph(self, graph: ModuleGraph) -> "PassContext":
        return replace(self, graph=graph)


@dataclass(frozen=True)
class MemoryEffect:
    """How a pass changes one rank's memory, for od.inspect's estimate.

    Parameters, gradients and optimizer state of the modules in ``modules`` (None: all of
    them) are split over this many ranks; ``activation_split`` divides the traced
    activations (tensor / context parallel); ``parameter_bytes`` is a change in stored
    bytes (a smaller storage dtype); ``inference`` says no gradients or optimizer state
    exist; ``checkpointed`` names the blocks whose activations are recomputed
    (``selective``: op-level, counted as none). ``held`` splits the model between ranks
    (model-parallel stages): the modules each such rank holds; the estimate counts the
    heaviest.
    """

    parameters: int = 1
    gradients: int = 1
    optimizer: int = 1
    modules: tuple[str, ...] | None = None
    activation_split: int = 1
    parameter_bytes: int = 0
    inference: bool = False
    checkpointed: tuple[str, ...] = ()
    selective: bool = False
    held: tuple[tuple[str, ...], ...] | None = None
    notes: tuple[str, ...] = ()


@dataclass(kw_only=True)
class Decision:
    """What a pass will do. ``check`` returns one (a pass may subclass it with typed fields:
    the styles it picked, the modules it skips and why); ``preview`` renders it and
    ``apply`` executes it. ``modules``: qualified names it will act on (``""``: the root)."""

    modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    memory: MemoryEffect | None = None


@runtime_checkable
class Engine(Protocol):
    """An engine that owns backward and the optimizer step (a ZeRO engine): ``rt.backward``
    calls ``backward``; ``rt.optimizer.step()`` calls ``step`` on every micro-step."""

    def backward(self, loss: Any, **kwargs: Any) -> Any: ...

    def step(self) -> Any: ...

    def zero_grad(self) -> Any: ...


@dataclass(frozen=True)
class KeyMap:
    """A pass that renames state-dict keys maps them back: ``to_model`` turns a key of the
    transformed model into the user's model's key, ``from_model`` the other way."""

    to_model: Callable[[str], str]
    from_model: Callable[[str], str]


@dataclass(frozen=True)
class SyncCollective:
    """One collective entry summarising what an engine issues in one pass over the model
    (all its buckets or units): ``op``, ``dtype``, ``numel`` (elements over all of them),
    ``where`` (the ledger's tag, e.g. "gradient sync (4 gradients)")."""

    op: str
    dtype: str
    numel: int
    where: str


class CollectiveTap:
    """Where a pass reports, from a hook of its own (the root's forward, say), that its
    engine issued the collectives ``entry`` summarises: ``tap()`` passes ``entry`` to the
    listener the runtime attaches (its collective ledger), or does nothing while none
    is."""

    __slots__ = ("entry", "listener")

    def __init__(self, entry: SyncCollective):
        self.entry = entry
        self.listener: Callable[[SyncCollective], None] | None = None

    def __call__(self, *_: Any) -> None:
        listener = self.listener
        if listener is not None:
            listener(self.entry)


@dataclass(frozen=True)
class EngineCollectives:
    """What a data-parallel engine issues from torch's own C++ and hooks,
    summarised for the collective ledger — one entry per pass, computed once, never per
    bucket: ``synced_backward`` for each backward that syncs gradients (not inside
    ``rt.accumulate``'s no-sync micro-steps), ``unsynced_backward`` for one that does not
    (re-all-gathers of sharded parameters; None: it issues nothing), and ``forward_tap``, a
    tap the pass calls from a hook on the root's forward (all-gathers; None: no entry)
    — forwards happen in user code, where the runtime has no call of its own.
    The runtime notes them from ``rt.backward``, so a rank that skips a synced backward
    is caught at the next optimizer step."""

    synced_backward: SyncCollective
    unsynced_backward: SyncCollective | None = None
    forward_tap: CollectiveTap | None = None


@dataclass
class Applied:
    """What ``apply`` returns: its record and what it hands on to the runtime."""

    record: PassRecord
    forward_contexts: list[ForwardContext] = field(default_factory=list)
    post_step_hooks: list[PostStepHook] = field(default_factory=list)
    # fn(bool): gradient all-reduce on/off (rt.accumulate's non-sync micro-steps)
    gradient_sync: Callable[[bool], None] | None = None
    engine: Engine | None = None
    optimizer: Any = None  # the optimizer an engine built (or wrapped)
    batch_transform: Callable[[Any], Any] | None = None  # rt.shard_sequence
    key_map: KeyMap | None = None
    engine_collectives: EngineCollectives | None = None


@dataclass
class Handoff:
    """Every pass's contributions, gathered in pass order: what the runtime consumes."""

    forward_contexts: list[ForwardContext] = field(default_factory=list)
    post_step_hooks: list[PostStepHook] = field(default_factory=list)
    gradient_sync: Callable[[bool], None] | None = None
    engine: Engine | None = None
    optimizer: Any = None
    batch_transforms: list[Callable[[Any], Any]] = field(default_factory=list)
    key_maps: list[KeyMap] = field(default_factory=list)
    engine_collectives: EngineCollectives | None = None

    def add(self, name: str, applied: Applied) -> None:
        for slot in ("gradient_sync", "engine", "optimizer", "engine_collectives"):
            given = getattr(applied, slot)
            if given is not None and getattr(self, slot) is not None:
                raise PlanError(f"pass '{name}' hands on a second {slot.replace('_', ' ')}; "
                                "only one pass in a plan may own it")
            if given is not None:
                setattr(self, slot, given)
        self.forward_contexts += applied.forward_contexts
        self.post_step_hooks += applied.post_step_hooks
        if applied.batch_transform is not None:
            self.batch_transforms.append(applied.batch_transform)
        if applied.key_map is not None:
            self.key_maps.append(applied.key_map)

    def transform_batch(self, batch: Any) -> Any:
        for fn in self.batch_transforms:
            batch = fn(batch)
        return batch

    def to_model_key(self, key: str) -> str:
        for m in reversed(self.key_maps):
            key = m.to_model(key)
        return key

    def from_model_key(self, key: str) -> str:
        for m in self.key_maps:
            key = m.from_model(key)
        return key


class Pass:
    """One transformation, keyed by its config type. Subclass it and register it with
    ``@od.register_pass(name, config=MyConfig, after=..., before=...)``.

    ``check(ctx) -> Decision`` raises ``PlanError`` / ``BackendUnavailable`` for anything
    it cannot do and must not mutate; ``preview(decision, ctx)`` is the dry-run account
    od.inspect shows; ``apply(model, decision, ctx)`` does exactly the decision and returns
    an ``Applied`` (a bare ``PassRecord``, or None for "the decision, done", also works).
    A pass keeps nothing on ``self`` between the steps.
    """

    name: ClassVar[str] = ""
    config: ClassVar[type | None] = None
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    # True when apply replaces nn.Parameter objects (sharding, wrapping engines):
    # an optimizer built beforehand would then point at stale tensors.
    replaces_parameters: ClassVar[bool] = False

    def check(self, ctx: PassContext) -> Decision:
        return Decision()

    def preview(self, decision: Decision, ctx: PassContext) -> PassRecord:
        return self.record(modules=list(decision.modules), notes=list(decision.notes),
                           details=dict(decision.details))

    def apply(self, model: nn.Module, decision: Decision,
              ctx: PassContext) -> Applied | PassRecord | None:
        raise NotImplementedError(f"pass {self.name!r} has no apply()")

    def record(self, **kwargs: Any) -> PassRecord:
        return PassRecord(self.name, **kwargs)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
