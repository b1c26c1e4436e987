"""``od.Candidate``: one layout the planner proposes, with what it predicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..plan_spec import Plan
from ..rewrite.report import human_bytes
from .layout import Layout
from .memory import Memory


@dataclass(frozen=True)
class Candidate:
    """A checked layout and its predicted cost for one optimizer step, per rank.

    ``plan`` is ready for ``od.accelerate``; ``memory`` the per-rank peak by part (under
    pp, the pipeline rank with the highest peak); ``comm`` bytes per step {collective
    kind: {mesh dim: bytes}} (under pp, the rank that moves the most); ``bubble`` the pipeline's
    idle fraction; ``tokens_per_second`` for the whole job (``tokens_per_second_per_gpu``
    per rank); ``mfu`` model FLOPs over the dense bf16 peak; ``why`` the binding
    constraint or the dominant cost."""

    plan: Plan
    layout: Layout
    memory: Memory
    comm: dict[str, dict[str, int]]
    bubble: float
    step_seconds: float
    tokens_per_second: float
    mfu: float
    why: str
    world_size: int
    memory_per_rank: int
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_per_rank

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.tokens_per_second / self.world_size

    def comm_bytes(self) -> int:
        return sum(sum(v.values()) for v in self.comm.values())

    def row(self) -> tuple[str, ...]:
        lay = self.layout
        return (lay.name(), str(lay.micro_batch), str(lay.grad_accum),
                human_bytes(self.memory.total), human_bytes(self.comm_bytes()),
                f"{self.step_seconds:.3f}", f"{self.tokens_per_second_per_gpu:,.0f}",
                f"{self.mfu:.1%}", self.why)

    def __str__(self) -> str:
        m = self.memory
        lines = [f"{self.layout.name()}: {self.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, "
                 f"step {self.step_seconds:.3f} s, MFU {self.mfu:.1%} — {self.why}",
                 f"  micro-batch {self.layout.micro_batch} × {self.layout.grad_accum} "
                 f"micro-steps; pipeline bubble {self.bubble:.1%}",
                 f"  memory per rank {human_bytes(m.total)} of "
                 f"{human_bytes(self.memory_per_rank)} (peak in {m.phase}): parameters "
                 f"{human_bytes(m.parameters)}, gradients {human_bytes(m.gradients)}, "
                 f"optimizer {human_bytes(m.optimizer)}, activations "
                 f"{human_bytes(m.activations)}, fsdp buffers {human_bytes(m.fsdp_buffers)}, "
                 f"temporaries {human_bytes(m.temporaries)}"]
        for kind, dims in self.comm.items():
            per = ", ".join(f"{d} {human_bytes(b)}" for d, b in dims.items())
            lines.append(f"  {kind}: {per}")
        return "\n".join(lines)


HEADER = ("layout", "mbs", "accum", "memory", "comm/step", "step s", "tok/s/GPU", "MFU", "why")


def table(candidates: list[Candidate]) -> str:
    """The candidates as an aligned text table, best first."""
    rows = [HEADER] + [c.row() for c in candidates]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    out = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]
        out.append("  ".join(cells))
        if j == 0:
            out.append("  ".join("-" * w for w in widths) + "  ---")
    return "\n".join(out)


class Candidates(list):
    """``od.plan``'s answer: a list of Candidates, best first, printed as a table."""

    def __str__(self) -> str:
        return table(list(self))

    def table(self) -> str:
        return table(list(self))
