"""pipeline: split the model into pipeline stages (``parallel.pp``, config ``od.Pipeline``).

The split itself is plain functions in ``overdrive/stages.py`` (``stage_layout``,
``check_pipeline``, ``carve_stage``), shared with the pipeline runtime. This pass checks
the split before anything is mutated and decides it: which blocks each stage holds, which
rank holds which stages (``MemoryEffect.held``: the estimate counts the heaviest pipeline
rank), the schedule and its bubble. ``od.accelerate`` carves this rank's stages and runs
every pass on each stage as its own model part; on a carved stage this pass's decision is
the layout the stage was cut with, and ``apply`` only records it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..bubble import bubble_fraction
from ..plan_spec import Pipeline
from ..rewrite.contract import Applied, Decision, MemoryEffect, Pass, PassContext
from ..rewrite.manager import register_pass
from ..stages import (ZERO_BUBBLE, StageInput, StageLayout, balanced_starts,  # noqa: F401
                      carve_stage, check_pipeline, stage_layout)


@dataclass(kw_only=True)
class PipelineDecision(Decision):
    """``layout``: the stages (blocks, head/tail modules, ranks); ``stage``: on a carved
    stage of a real run, its index (None when deciding for the whole model)."""

    layout: StageLayout
    stage: int | None = None


def describe_plan(layout: StageLayout, cfg: Pipeline) -> dict:
    mb = cfg.microbatches or layout.num_stages
    return {"schedule": cfg.schedule, "microbatches": mb,
            "stages_per_rank": cfg.stages_per_rank, "num_stages": layout.num_stages,
            "stages": layout.describe(), "cost": list(layout.cost),
            "stage_flops": list(layout.flops),
            "bubble_fraction": bubble_fraction(cfg.schedule, layout.pp, mb,
                                               cfg.stages_per_rank, layout.flops or None)}


def held_by_rank(layout: StageLayout) -> tuple[tuple[str, ...], ...]:
    """The modules each pipeline rank holds (all its stages')."""
    ranks: dict[int, list[str]] = {}
    for st in layout.describe():
        ranks.setdefault(st["rank"], []).extend(st["modules"])
    return tuple(tuple(ranks[k]) for k in sorted(ranks))


def decide(layout: StageLayout, cfg: Pipeline, stage: int | None) -> PipelineDecision:
    details = describe_plan(layout, cfg)
    notes = [f"pipeline stage {st['stage']} (rank {st['rank']}): blocks "
             f"{st['blocks'][0]}-{st['blocks'][-1]}" for st in details["stages"]]
    notes.append(f"pipeline: bubble {details['bubble_fraction']} ({cfg.schedule}, "
                 f"{details['microbatches']} micro-batches); the memory estimate counts "
                 "the heaviest pipeline rank")
    if stage is not None:
        details["stage"] = stage
    modules = list(layout.blocks) if stage is None else list(layout.stage_blocks(stage))
    return PipelineDecision(modules=modules, notes=notes, details=details, layout=layout,
                            stage=stage, memory=MemoryEffect(held=held_by_rank(layout)))


@register_pass("pipeline", config=Pipeline,
               before=("casting", "fp8", "tensor_parallel", "context_parallel",
                       "checkpointing", "compile", "mixed_precision", "fsdp", "ddp",
                       "deepspeed"))
class PipelinePass(Pass):
    """Checks and decides the split; the stages themselves are carved in ``od.accelerate``
    before the other passes run on each of them."""

    def check(self, ctx: PassContext) -> PipelineDecision:
        model = ctx.graph.model
        carved = getattr(model, "_overdrive_layout", None)
        if carved is not None:  # a stage od.accelerate cut out: its layout is decided
            return decide(carved, ctx.cfg, getattr(model, "_overdrive_stage_index", None))
        return decide(check_pipeline(ctx.graph, ctx.plan), ctx.cfg, None)

    def apply(self, model: nn.Module, decision: PipelineDecision, ctx: PassContext) -> Applied:
        return Applied(self.preview(decision, ctx))
