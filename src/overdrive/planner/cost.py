"""Step time from the trace's FLOPs and the step's bytes on the wire.

    compute  = Σ FLOPs / (peak(dtype) × efficiency)     (per rank: the trace's forward +
               backward FLOPs × sequences / (tp·cp·pp), plus the forward of every
               recomputed block; fp8 Linears at the fp8 peak)
    pipeline = compute / (1 − bubble)                   (bubble from overdrive.bubble)
    ring     : all-reduce 2(n−1)/n · B/bw + 2(n−1)α, all-gather / reduce-scatter
               (n−1)/n · B/bw + (n−1)α, broadcast / send B/bw + α   (per call for α)
    bw       = intra_node_bw when the group's ranks share a node, else inter_node_bw
    step     = max(compute, overlapped comm) + exposed comm + optimizer
    optimizer= 28 bytes per parameter on this rank (AdamW fp32: read p, g, m, v; write
               p, m, v) / hbm_bw

FSDP's all-gathers / reduce-scatters and the data-parallel gradient all-reduce overlap
with compute (prefetch, bucketing); TP, CP and PP transfers are on the critical path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bubble import bubble_fraction
from .checked import Checked
from .comm import Comm
from .hardware import Hardware
from .layout import Layout

MESH = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # row-major, tp innermost


@dataclass(frozen=True)
class Time:
    compute: float
    overlapped: float
    exposed: float
    optimizer: float
    bubble: float
    dominant: str  # "compute", "bubble" or the kind/dim of the largest exposed transfer

    @property
    def step(self) -> float:
        return max(self.compute, self.overlapped) + self.exposed + self.optimizer


def group(layout: Layout, dim: str) -> tuple[int, int]:
    """(size, stride) of the ranks a collective over ``dim`` spans."""
    parts = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp")}.get(
        dim, (dim,))
    size = 1
    for p in parts:
        size *= getattr(layout, p)
    inner = MESH[MESH.index(parts[-1]) + 1:]
    stride = 1
    for d in inner:
        stride *= getattr(layout, d)
    return size, stride


def transfer_seconds(kind: str, dim: str, nbytes: int, calls: int, layout: Layout,
                     hw: Hardware) -> float:
    n, stride = group(layout, dim)
    if n <= 1:
        return 0.0
    bw = hw.intra_node_bw if n * stride <= hw.gpus_per_node else hw.inter_node_bw
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * hw.alpha * calls
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * nbytes / bw + (n - 1) * hw.alpha * calls
    return nbytes / bw + hw.alpha * calls


def compute_flops(checked: Checked, trace, layout: Layout,
                  selective_flops: dict[str, int] | None = None) -> tuple[float, float]:
    """(high-precision FLOPs, fp8 FLOPs) this rank runs in one step. A recomputed block
    runs its forward again; under selective recompute only the matmuls its policy does
    not save (``selective_flops``, planner/selective.py)."""
    seqs = layout.micro_batch * layout.grad_accum
    split = layout.tp * layout.cp * layout.pp
    total = (trace.forward_flops + trace.backward_flops) * seqs / split
    again = selective_flops if layout.ac == "selective" and selective_flops is not None \
        else {b: trace[b].flops for b in checked.recomputed if b in trace.modules}
    recompute = sum(again.get(b, 0) for b in checked.recomputed)
    total += recompute * seqs / split
    fp8 = 0.0
    from ..passes.fp8 import FP8Decision

    d = checked.find(FP8Decision)
    if d is not None:
        linear = sum(trace[n].flops for n in d.selection.convert if n in trace.modules)
        fp8 = 3 * linear * seqs / split  # forward, and the two backward matmuls
    return total - fp8, fp8


def step_time(checked: Checked, trace, layout: Layout, comm: Comm, hw: Hardware,
              compute_dtype: str, params_on_rank: int,
              selective_flops: dict[str, int] | None = None) -> Time:
    high, low = compute_flops(checked, trace, layout, selective_flops)
    compute = high / (hw.peak(compute_dtype) * hw.efficiency)
    if low:
        compute += low / (hw.peak("fp8") * hw.efficiency)
    bubble = 0.0
    if layout.pp > 1:
        bubble = bubble_fraction(layout.schedule, layout.pp, layout.grad_accum, 1) or 0.0
        compute /= 1 - bubble
    overlapped = exposed = 0.0
    worst, worst_name = 0.0, ""
    for kind, dims in comm.bytes.items():
        for dim, nbytes in dims.items():
            t = transfer_seconds(kind, dim, nbytes, comm.calls[(kind, dim)], layout, hw)
            if (kind, dim) in comm.overlapped:
                overlapped += t
            else:
                exposed += t
            if t > worst:
                worst, worst_name = t, f"{kind} over {dim}"
    optimizer = 28 * params_on_rank / hw.hbm_bw
    if overlapped > compute and overlapped >= exposed:
        dominant = f"communication ({worst_name}) not hidden by compute"
    elif exposed > 0.3 * compute:
        dominant = f"exposed {worst_name}"
    elif bubble > 0.2:
        dominant = f"pipeline bubble {bubble:.0%}"
    else:
        dominant = "compute"
    return Time(compute, overlapped, exposed, optimizer, bubble, dominant)
