"""One point of the search space: mesh sizes, engine, recompute, micro-batching, fp8,
FSDP's reshard_after_forward — and the ``od.Plan`` it stands for."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan_spec import DDP, FP8, FSDP, Checkpointing, Parallel, Pipeline, Plan

AC_MODES = ("none", "selective", "every", "full")


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    engine: str | None = None  # "fsdp" | "ddp" | None (one rank)
    ac: str = "none"  # AC_MODES; "every" recomputes every 2nd block
    micro_batch: int = 1  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step (pp: pipeline micro-batches)
    fp8: bool = False
    reshard_after_forward: bool = True
    mixed_precision: str = "bf16"  # "no" | "bf16"
    schedule: str = "1f1b"  # the pipeline schedule under pp > 1 ("1f1b" | "gpipe")
    sequence_parallel: bool = False  # with tp > 1: norms and activations split on the sequence
    loss_parallel: bool = False  # with tp > 1: logits stay vocab-sharded for the loss

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def name(self) -> str:
        parts = []
        if self.engine == "fsdp":
            parts.append(f"hsdp {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1
                         else f"fsdp {self.dp_shard}")
        elif self.engine == "ddp":
            parts.append(f"ddp {self.dp_replicate}")
        for dim in ("tp", "cp", "pp"):
            if getattr(self, dim) > 1:
                parts.append(f"{dim} {getattr(self, dim)}")
            if dim == "tp" and self.tp > 1 and self.sequence_parallel:
                parts.append("sp")
            if dim == "tp" and self.tp > 1 and self.loss_parallel:
                parts.append("loss-parallel")
        if self.pp > 1:
            parts.append(self.schedule)
        if self.ac != "none":
            parts.append("ac " + ("every-2" if self.ac == "every" else self.ac))
        if self.fp8:
            parts.append("fp8")
        if self.engine == "fsdp" and not self.reshard_after_forward:
            parts.append("no-reshard")
        return " + ".join(parts) or "single"

    def to_plan(self) -> Plan:
        parallel = Parallel(pp=self.pp, dp_replicate=self.dp_replicate,
                            dp_shard=self.dp_shard, cp=self.cp, tp=self.tp,
                            sequence_parallel=self.sequence_parallel and self.tp > 1,
                            loss_parallel=self.loss_parallel and self.tp > 1)
        kwargs = {}
        if self.engine == "fsdp":
            kwargs["fsdp"] = FSDP(reshard_after_forward=self.reshard_after_forward)
        elif self.engine == "ddp":
            kwargs["ddp"] = DDP()
        if self.ac != "none":
            kwargs["checkpointing"] = Checkpointing(mode=self.ac, every=2)
        if self.fp8:
            kwargs["fp8"] = FP8()
        if self.pp > 1:
            kwargs["pipeline"] = Pipeline(schedule=self.schedule, microbatches=self.grad_accum)
            grad_accum = 1
        else:
            grad_accum = self.grad_accum
        return Plan(parallel=parallel, mixed_precision=self.mixed_precision,
                    grad_accum=grad_accum, **kwargs)


def layout_of(plan: Plan, *, micro_batch: int) -> Layout:
    """The layout a resolved plan (concrete sizes) stands for."""
    par = plan.parallel
    ac = "none" if plan.checkpointing is None else plan.checkpointing.mode
    engine = "fsdp" if plan.fsdp else "ddp" if plan.ddp else None
    accum = (plan.pipeline.microbatches or par.pp) if par.pp > 1 and plan.pipeline \
        else plan.grad_accum
    return Layout(pp=par.pp, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, cp=par.cp,
                  tp=par.tp, engine=engine, ac=ac, micro_batch=micro_batch, grad_accum=accum,
                  fp8=plan.fp8 is not None,
                  reshard_after_forward=plan.fsdp.reshard_after_forward if plan.fsdp else True,
                  mixed_precision=plan.mixed_precision,
                  schedule=plan.pipeline.schedule if plan.pipeline else "1f1b",
                  sequence_parallel=par.sequence_parallel, loss_parallel=par.loss_parallel)
