"""PassRecord and Report: what each pass did, as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .graph import group_by_parent


@dataclass
class PassRecord:
    """One pass's account of itself. ``modules`` are qualified names it touched."""

    name: str
    modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    dry_run: bool = False  # from od.inspect: what would happen, nothing applied
    details: dict[str, Any] = field(default_factory=dict)  # pass-specific facts

    def note(self, text: str) -> None:
        self.notes.append(text)

    def touch(self, name: str) -> None:
        if name not in self.modules:
            self.modules.append(name)


@dataclass
class MemoryEstimate:
    """Per-rank bytes under the plan's sharding (from ``od.inspect``)."""

    world_size: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int | None = None  # from the meta trace, when example inputs were given
    full_parameters: int = 0  # the unsharded model, for comparison
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + (self.activations or 0)


@dataclass(frozen=True)
class StepLayout:
    """One optimizer step: its samples over the data ranks and what its loss is the mean
    over. ``grad_accum`` is None while it waits for the loader's batch size
    (``Plan.global_batch_size``: rt.shard derives it; od.inspect with ``example_inputs``)."""

    dp_size: int
    cp: int
    grad_accum: int | None
    global_batch_size: int | None
    batch_size: int | None  # the loader's, per data rank (None: not known yet)
    loss_normalization: str

    def line(self) -> str:
        if self.grad_accum is None:
            accum = (f"grad_accum = {self.global_batch_size} / (loader batch size × "
                     f"{self.dp_size} data rank(s)), derived at rt.shard")
        else:
            accum = f"grad_accum {self.grad_accum}"
        layout = f"{self.dp_size} data rank(s)"
        if self.batch_size is not None:
            layout += f" × batch {self.batch_size}"
        if self.global_batch_size is not None:
            layout = f"global_batch_size {self.global_batch_size} = {layout}"
        return (f"step: {layout}, {accum}; cp {self.cp}; loss normalisation "
                f"{self.loss_normalization!r}")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class Report:
    """The passes that ran (or would run) with their records, plus context."""

    def __init__(self, passes: list[PassRecord] | None = None, *, model: str = "",
                 plan: dict[str, Any] | None = None, blocks: list[str] | None = None,
                 memory: MemoryEstimate | None = None, dry_run: bool = False,
                 trace: Any = None, steps: StepLayout | None = None,
                 choice: dict[str, Any] | None = None):
        self.passes: list[PassRecord] = list(passes or [])
        self.model = model
        self.plan = plan or {}
        self.blocks = list(blocks or [])
        self.memory = memory
        self.dry_run = dry_run
        self.trace = trace
        self.choice = choice  # plan="auto": the planner's choice and why
        self.steps = steps

    def names(self) -> list[str]:
        return [r.name for r in self.passes]

    def block_groups(self) -> list[list[str]]:
        """The blocks split into their stacks (T5: the encoder's, then the decoder's)."""
        return group_by_parent(self.blocks)

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.passes:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} in this report; passes: {self.names()}")

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    # -- output ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "dry_run": self.dry_run,
            "blocks": self.blocks,
            "block_groups": self.block_groups(),
            "plan": _jsonable(self.plan),
            "passes": [_jsonable(asdict(r)) for r in self.passes],
        }
        if self.memory is not None:
            mem = asdict(self.memory)
            mem["total"] = self.memory.total
            out["memory_per_rank"] = mem
        if self.trace is not None and hasattr(self.trace, "summary"):
            out["trace"] = self.trace.summary()
        if self.choice is not None:
            out["choice"] = dict(self.choice)
        if self.steps is not None:
            out["steps"] = asdict(self.steps)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        title = "overdrive plan (dry run, nothing applied)" if self.dry_run else "overdrive report"
        lines = [f"{title}: {self.model}"]
        if self.blocks:
            parts = [f"{len(g)} under '{g[0].rpartition('.')[0] or '<root>'}'"
                     for g in self.block_groups()]
            lines.append(f"blocks: {', '.join(parts)}")
        else:
            lines.append("blocks: none found")
        st = self.steps
        if st is not None and (st.global_batch_size is not None or st.grad_accum != 1):
            lines.append(st.line())
        rows = [("#", "pass", "modules", "params before", "params after", "seconds")]
        for i, r in enumerate(self.passes, 1):
            rows.append((str(i), r.name, str(len(r.modules)), human_bytes(r.bytes_before),
                         human_bytes(r.bytes_after), "-" if r.dry_run else f"{r.seconds:.3f}"))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        for j, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.choice is not None:
            c = self.choice
            lines.append(f"plan='auto': chose {c['chosen']} (micro-batch {c['micro_batch']} × "
                         f"{c['grad_accum']}) — {c['why']}")
        if not self.passes:
            lines.append("(no passes enabled)")
        for r in self.passes:
            for n in r.notes:
                lines.append(f"  [{r.name}] {n}")
        if self.memory is not None:
            m = self.memory
            lines.append(f"memory per rank (world size {m.world_size}):")
            lines.append(f"  parameters  {human_bytes(m.parameters):>12}   "
                         f"(full model {human_bytes(m.full_parameters)})")
            lines.append(f"  gradients   {human_bytes(m.gradients):>12}")
            lines.append(f"  optimizer   {human_bytes(m.optimizer):>12}")
            if m.activations is not None:
                lines.append(f"  activations {human_bytes(m.activations):>12}")
            lines.append(f"  total       {human_bytes(m.total):>12}")
            for n in m.notes:
                lines.append(f"  note: {n}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report(passes={self.names()}, dry_run={self.dry_run})"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if callable(obj):
        return f"<callable {getattr(obj, '__qualname__', repr(obj))}>"
    return repr(obj)
