"""Pipeline stages by module surgery on the model's block list.

torchtitan's ``pipeline_module_split`` approach, found generically from the module graph:
the repeated blocks live in one container (``layers``); a stage keeps a contiguous run of
them under their original keys (``layers.2``, ``layers.3``), so every parameter keeps its
fully qualified name. The modules with parameters before the blocks (the token
embedding) belong to the first stage, those after them (final norm, output head) to the
last. Elsewhere the embedding becomes a ``StageInput`` that hands the forward the
activation received from the previous stage, and the norm/head become ``nn.Identity``:
the model's own ``forward`` runs unchanged on every stage, so transformers models work.

Plain functions (``stage_layout``, ``check_pipeline``, ``carve_stage``) shared by the
pipeline pass (``passes/pipeline.py``: checks and reports) and the pipeline runtime
(``runtime/pipeline.py``: carves this rank's stages, builds torch's ``PipelineStage``
objects and the schedule): a neutral module, so neither imports the other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PlanError
from .plan_spec import Plan
from .rewrite.graph import ModuleGraph, parameter_owners
from .rewrite.trace import trace_model

ZERO_BUBBLE = ("zero-bubble", "zbv")  # split backward (input / weight): no torch.compile


@dataclass(frozen=True)
class StageLayout:
    """Where the stages begin and what each holds; the same on every rank."""

    container: str  # qualified name of the block list ("layers", "model.layers")
    blocks: tuple[str, ...]  # every block, in order
    head: tuple[str, ...]  # modules with parameters before the blocks (first stage)
    tail: tuple[str, ...]  # modules with parameters after the blocks (last stage)
    starts: tuple[int, ...]  # block index where each stage begins
    pp: int
    style: str  # "loop" (stage s on rank s % pp) or "v" (zbv)
    param_bytes: tuple[int, ...] = field(default=())  # per stage
    cost: tuple[float, ...] = field(default=())  # per stage, the balanced quantity
    flops: tuple[float, ...] = field(default=())  # per stage, forward FLOPs (traced or estimated)

    @property
    def num_stages(self) -> int:
        return len(self.starts)

    def stage_blocks(self, stage: int) -> tuple[str, ...]:
        end = self.starts[stage + 1] if stage + 1 < self.num_stages else len(self.blocks)
        return self.blocks[self.starts[stage]:end]

    def rank_of(self, stage: int) -> int:
        if self.style == "v":
            rnd, pos = divmod(stage, self.pp)
            return pos if rnd % 2 == 0 else self.pp - 1 - pos
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == pp_rank]

    def describe(self) -> list[dict]:
        out = []
        for s in range(self.num_stages):
            names = self.stage_blocks(s)
            mods = (list(self.head) if s == 0 else []) + list(names) + (
                list(self.tail) if s == self.num_stages - 1 else [])
            out.append({"stage": s, "rank": self.rank_of(s),
                        "blocks": [self.blocks.index(n) for n in names], "modules": mods,
                        "param_bytes": self.param_bytes[s] if self.param_bytes else None})
        return out


# --------------------------------------------------------------------------- layout


def _within(name: str, unit: str) -> bool:
    return unit == "" or name == unit or name.startswith(unit + ".")


def _outer_param_modules(graph: ModuleGraph, container: str) -> tuple[list[str], list[str]]:
    """Outermost modules holding parameters outside the block container, split into those
    defined before it and those after it."""
    order = {n: i for i, n in enumerate(graph.names())}
    ancestors = {container.rsplit(".", i)[0] for i in range(container.count(".") + 1)} | {""}
    chosen: list[str] = []
    for name in graph.names():
        if name in ancestors or _within(name, container):
            continue
        if any(_within(name, c) for c in chosen):
            continue
        if graph.subtree_params(name) > 0:
            chosen.append(name)
    at = order[container]
    return [n for n in chosen if order[n] < at], [n for n in chosen if order[n] > at]


def stage_layout(graph: ModuleGraph, plan: Plan) -> StageLayout:
    """The stage split of ``graph``'s model under ``plan`` (raises ``PlanError``)."""
    pipe = plan.pipeline
    pp = plan.parallel.pp
    stages = pp * pipe.stages_per_rank
    blocks = list(graph.blocks())
    if not blocks:
        raise PlanError(
            f"parallel.pp={pp}: no repeated blocks found to split into pipeline stages; "
            "name them with Plan(blocks=('layers.*',))")
    parents = {b.rpartition(".")[0] for b in blocks}
    if len(parents) != 1 or not isinstance(graph.module(next(iter(parents))),
                                           (nn.ModuleList, nn.Sequential)):
        raise PlanError(
            f"parallel.pp={pp}: the blocks must sit in one nn.ModuleList or nn.Sequential "
            f"to be split into stages; found them under {sorted(parents)}")
    container = next(iter(parents))
    if len(blocks) < stages:
        raise PlanError(
            f"parallel.pp={pp} × pipeline.stages_per_rank={pipe.stages_per_rank} = {stages} "
            f"stages need at least {stages} blocks; the model has {len(blocks)} "
            f"({container}); lower pp or stages_per_rank")
    head, tail = _outer_param_modules(graph, container)
    _check_ends(graph, head, tail, pp)
    fl = _block_flops(graph, blocks, head, tail)
    weights = _block_costs(graph, blocks, head, tail, fl)
    if pipe.split is not None:
        starts = _given_split(pipe.split, stages, len(blocks))
    else:
        starts = balanced_starts(weights, stages)
    style = "v" if pipe.schedule == "zbv" else "loop"
    layout = StageLayout(container, tuple(blocks), tuple(head), tuple(tail), tuple(starts),
                         pp, style)
    return _with_sizes(layout, graph, weights, fl)


def _check_ends(graph: ModuleGraph, head: list[str], tail: list[str], pp: int) -> None:
    if len(head) != 1 or not isinstance(graph.module(head[0]), nn.Embedding):
        found = ", ".join(f"{n} ({graph.g.nodes[n]['cls']})" for n in head) or "none"
        raise PlanError(
            f"parallel.pp={pp}: a pipeline split needs exactly one module with parameters "
            f"before the blocks, the token nn.Embedding (later stages receive activations "
            f"in its place); found {found}")
    owners = parameter_owners(graph.model)
    for name in head + tail:
        for p in graph.module(name).parameters():
            if not all(_within(o, name) for o in owners[id(p)]):
                raise PlanError(
                    f"parallel.pp={pp}: {name} shares parameters with "
                    f"{sorted(o for o in owners[id(p)] if not _within(o, name))} (tied "
                    "embeddings) and the first and last stage live on different ranks; "
                    "untie them (tie_word_embeddings=False) or use pp=1")


TRACE_TOKENS = (1, 64)  # token ids the FLOPs trace runs with (meta device: no compute)


def _block_flops(graph: ModuleGraph, blocks: list[str], head: list[str], tail: list[str]
                 ) -> list[float]:
    """Each block's forward FLOPs, the head's added to the first block and the tail's to
    the last: from a meta-device trace with ``TRACE_TOKENS`` token ids, or — when the
    model cannot be traced that way — twice the non-embedding parameters (a matmul
    costs two FLOPs per weight per token, an embedding lookup none)."""
    try:
        trace = trace_model(graph.model, torch.zeros(TRACE_TOKENS, dtype=torch.long),
                            backward=False)
        def flops(name: str) -> float:
            rec = trace.modules.get(name)
            return float(rec.flops) if rec is not None else 0.0
        if sum(flops(b) for b in blocks) <= 0:
            raise ValueError("no traced FLOPs in the blocks")
    except Exception:  # noqa: BLE001 - any model the token-id trace does not fit
        def flops(name: str) -> float:
            return 2.0 * sum(graph.g.nodes[n]["params"] for n in graph.subtree(name)
                             if not isinstance(graph.module(n), nn.Embedding))
    fl = [flops(b) for b in blocks]
    fl[0] += sum(flops(n) for n in head)
    fl[-1] += sum(flops(n) for n in tail)
    return fl


def _block_costs(graph: ModuleGraph, blocks: list[str], head: list[str], tail: list[str],
                 fl: list[float]) -> list[float]:
    """Each block's share of parameters and of forward FLOPs, averaged, with the head on
    the first block and the tail on the last."""
    params = [graph.subtree_params(b) for b in blocks]
    params[0] += sum(graph.subtree_params(n) for n in head)
    params[-1] += sum(graph.subtree_params(n) for n in tail)
    tp, tf = max(sum(params), 1), max(sum(fl), 1)
    return [(p / tp + f / tf) / 2 for p, f in zip(params, fl)]


def balanced_starts(weights: list[float], stages: int) -> list[int]:
    """Contiguous split of ``weights`` into ``stages`` non-empty runs minimising the
    heaviest run (exact, by dynamic programming); returns where each run begins."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = cost, i
    starts, j = [], n
    for k in range(stages, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return starts[::-1]


def _given_split(split: tuple[int, ...], stages: int, n_blocks: int) -> list[int]:
    starts = list(split)
    if len(starts) == stages - 1 and (not starts or starts[0] != 0):
        starts = [0] + starts
    if len(starts) != stages or starts[0] != 0 or starts[-1] >= n_blocks:
        raise PlanError(
            f"pipeline.split={tuple(split)!r} does not give {stages} stages of the "
            f"{n_blocks} blocks; give {stages} increasing block indices starting at 0 "
            f"(where each stage begins), e.g. {tuple(balanced_starts([1.0] * n_blocks, stages))}")
    return starts


def _with_sizes(layout: StageLayout, graph: ModuleGraph, weights: list[float],
                fl: list[float]) -> StageLayout:
    sizes, costs, stage_flops = [], [], []
    for s in range(layout.num_stages):
        names = list(layout.stage_blocks(s))
        if s == 0:
            names += list(layout.head)
        if s == layout.num_stages - 1:
            names += list(layout.tail)
        sizes.append(sum(graph.subtree_bytes(n) for n in names))
        idx = [layout.blocks.index(b) for b in layout.stage_blocks(s)]
        costs.append(round(sum(weights[i] for i in idx), 4))
        stage_flops.append(float(sum(fl[i] for i in idx)))
    return StageLayout(**{**layout.__dict__, "param_bytes": tuple(sizes),
                          "cost": tuple(costs), "flops": tuple(stage_flops)})


# --------------------------------------------------------------------------- checks


def check_pipeline(graph: ModuleGraph, plan: Plan) -> StageLayout:
    """Everything that can be refused before any mutation; returns the layout."""
    pipe = plan.pipeline
    stages = plan.parallel.pp * pipe.stages_per_rank
    if pipe.microbatches is not None and pipe.schedule == "1f1b" and pipe.microbatches < stages:
        raise PlanError(
            f"pipeline.microbatches={pipe.microbatches} is below the {stages} stages, which "
            f"schedule '1f1b' needs at least; use microbatches >= {stages} or 'gpipe'")
    mb = pipe.microbatches or stages
    if pipe.schedule in ("interleaved-1f1b", "zero-bubble"):
        rounds = max(1, mb // plan.parallel.pp)
        if mb % rounds:
            raise PlanError(
                f"pipeline.microbatches={mb} with schedule {pipe.schedule!r} must be a "
                f"multiple of the rounds ({rounds} = microbatches // pp); e.g. use "
                f"microbatches={plan.parallel.pp * rounds}")
    if pipe.schedule in ZERO_BUBBLE and plan.compile_enabled():
        raise PlanError(
            f"pipeline.schedule={pipe.schedule!r} splits the backward into input and weight "
            "parts, which torch.compile does not support; drop compile or use '1f1b' / "
            "'interleaved-1f1b'")
    return stage_layout(graph, plan)


# --------------------------------------------------------------------------- surgery


class StageInput(nn.Module):
    """Stands in for the token embedding on a stage that is not the first: called with
    the model's token ids, it returns the activation the previous stage sent."""

    stage_placeholder = True  # later passes (tp) leave it alone

    def __init__(self, io) -> None:
        super().__init__()
        self._io = io  # a plain attribute: not a submodule, not in the state dict

    def forward(self, *args, **kwargs):
        return self._io.received

    def extra_repr(self) -> str:
        return "activation from the previous stage"


class StageOutput(nn.Identity):
    """Stands in for the final norm / output head on a stage that is not the last: the
    activation passes through to the next stage."""

    stage_placeholder = True


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object sharing every child, parameter and buffer of ``module`` but
    with dicts (children, parameters, buffers, hooks) of its own to edit."""
    clone = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set)):
            clone.__dict__[key] = copy.copy(value)
    return clone


def _edited_tree(model: nn.Module, names: list[str], in_place: bool) -> dict[str, nn.Module]:
    """The modules at ``names`` and all their ancestors, cloned (or the originals when
    ``in_place``), wired to each other; returns them by qualified name."""
    wanted = {""}
    for n in names:
        parts = n.split(".")
        wanted.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    mods = dict(model.named_modules(remove_duplicate=False))
    out = {n: (mods[n] if in_place else _shallow_clone(mods[n])) for n in sorted(wanted, key=len)}
    for n, m in out.items():
        if n:
            parent, _, child = n.rpartition(".")
            out[parent]._modules[child] = m
    return out


def carve_stage(model: nn.Module, layout: StageLayout, stages: list[int], io=None, *,
                in_place: bool = False) -> nn.Module:
    """The part of ``model`` holding ``stages`` (contiguous or not): their blocks under
    their original keys; the head if the first stage is among them, else a
    ``StageInput`` reading ``io``; the tail if the last is, else identities. Every
    parameter keeps its qualified name. ``in_place`` edits ``model`` itself."""
    keep = {b for s in stages for b in layout.stage_blocks(s)}
    first, last = 0 in stages, layout.num_stages - 1 in stages
    edits = [layout.container] + ([] if first else list(layout.head)) + (
        [] if last else list(layout.tail))
    tree = _edited_tree(model, [e.rpartition(".")[0] for e in edits if e] + [layout.container],
                        in_place)
    container = tree[layout.container]
    container._modules = type(container._modules)(
        (k, m) for k, m in container._modules.items() if f"{layout.container}.{k}" in keep)
    for name in ([] if first else layout.head):
        parent, _, child = name.rpartition(".")
        tree[parent]._modules[child] = StageInput(io)
    for name in ([] if last else layout.tail):
        parent, _, child = name.rpartition(".")
        tree[parent]._modules[child] = StageOutput()
    return tree[""]


# --------------------------------------------------------------------------- pass


