"""Tensor-parallel styles for weights DTensor's Linear styles cannot shard: transformers'
``Conv1D`` (GPT-2, weight stored (in, out), q/k/v fused in ``c_attn``) and grouped MoE
experts (3-D ``gate_up_proj`` / ``down_proj``, gate and up fused).

Each parameter becomes a DTensor on the tp mesh with the placement that gives every rank
its own heads or hidden slice; a fused weight uses ``_StridedShard`` so rank r holds
``[q_r; k_r; v_r]`` (or ``[gate_r; up_r]``) while ``full_tensor()`` and the state dict
keep the model's own layout. The module then runs its own forward on the local shards
(Megatron's scheme): floating inputs pass through unchanged forward and have their
gradients summed over tp on the way back, and a row-parallel module's output is summed
over tp, its bias added once after the sum.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

CONV1D_COLWISE = "conv1d_colwise"
CONV1D_ROWWISE = "conv1d_rowwise"
EXPERTS = "experts"
LOCAL_STYLES = (CONV1D_COLWISE, CONV1D_ROWWISE, EXPERTS)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_grouped_experts(module: nn.Module) -> bool:
    """transformers 5.x grouped experts: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""
    gu, down = (getattr(module, n, None) for n in ("gate_up_proj", "down_proj"))
    return isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and \
        gu.dim() == 3 and down.dim() == 3 and gu.shape[1] == 2 * down.shape[2]


def fused_factor(name: str, module: nn.Module) -> int:
    """How many projections a column-parallel Conv1D fuses (GPT-2's c_attn: q, k, v)."""
    nx, nf = module.weight.shape
    if name.rpartition(".")[2] == "c_attn" and nf % nx == 0:
        return nf // nx
    return 1


def shard_size_error(name: str, module: nn.Module, style: str, tp: int) -> str | None:
    """Why ``tp`` cannot split this module's sharded dim evenly, else None."""
    if style == EXPERTS:
        inter = module.down_proj.shape[2]
        return None if inter % tp == 0 else f"{name}: intermediate size {inter}"
    nx, nf = module.weight.shape
    if style == CONV1D_ROWWISE:
        return None if nx % tp == 0 else f"{name}: input size {nx}"
    per = nf // fused_factor(name, module)
    return None if per % tp == 0 else f"{name}: output size {per} per fused projection"


class LocalShardParallel(ParallelStyle):
    """``placements`` per parameter name; ``reduce_output`` sums the output over tp
    (row-parallel), adding ``bias_after_reduce`` once after the sum; ``divide_attrs``: the
    module's integer attributes giving the sharded width (Conv1D's ``nf``). The inputs of a
    module that reads whole activations (column-parallel, experts) get their gradients
    summed over tp; a row-parallel one reads this rank's slice (``reduce_output`` alone)."""

    def __init__(self, placements: dict[str, object], reduce_output: bool = False,
                 bias_after_reduce: str | None = None, divide_attrs: tuple[str, ...] = (),
                 whole_input: bool = True):
        super().__init__()
        self.whole_input = whole_input
        self.divide_attrs = divide_attrs
        self.placements = placements
        self.reduce_output = reduce_output
        self.bias_after_reduce = bias_after_reduce

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        from torch.distributed.tensor import distribute_tensor

        for name, placement in self.placements.items():
            param = getattr(module, name)
            module.register_parameter(name, nn.Parameter(
                distribute_tensor(param.data, mesh, [placement]),
                requires_grad=param.requires_grad))
        for attr in self.divide_attrs:
            setattr(module, attr, getattr(module, attr) // mesh.size())
        module.forward = functools.partial(_local_forward, module.forward, module, self, mesh)
        return module


class _CopyToTp(torch.autograd.Function):
    """Identity forward; the gradient is summed over tp (each rank's is partial)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverTp(torch.autograd.Function):
    """The output summed over tp; the gradient (the same on every rank) passes as is."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _copy_to_tp(x, mesh):
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad):
        return x
    return _CopyToTp.apply(x, mesh.get_group())


def _sum_over_tp(x, mesh):
    return _SumOverTp.apply(x, mesh.get_group())


def _local_forward(forward, module: nn.Module, style: LocalShardParallel, mesh, *args, **kwargs):
    if style.whole_input:
        args = tuple(_copy_to_tp(a, mesh) for a in args)
        kwargs = {k: _copy_to_tp(v, mesh) for k, v in kwargs.items()}
    bias = None
    for name in style.placements:
        local = getattr(module, name).to_local()
        if name == style.bias_after_reduce:
            bias, local = local, torch.zeros_like(local)
        module.__dict__[name] = local  # shadows the DTensor parameter for this call
    try:
        out = forward(*args, **kwargs)
    finally:
        for name in style.placements:
            module.__dict__.pop(name, None)
    if style.reduce_output:
        out = _sum_over_tp(out, mesh)
        if bias is not None:
            out = out + bias
    return out


def make_local_style(name: str, module: nn.Module, style: str) -> LocalShardParallel:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if style == EXPERTS:
        return LocalShardParallel({"gate_up_proj": _StridedShard(1, split_factor=2),
                                   "down_proj": Shard(2)}, reduce_output=True)
    has_bias = getattr(module, "bias", None) is not None
    if style == CONV1D_COLWISE:
        k = fused_factor(name, module)
        weight = _StridedShard(1, split_factor=k) if k > 1 else Shard(1)
        bias = _StridedShard(0, split_factor=k) if k > 1 else Shard(0)
        return LocalShardParallel({"weight": weight, **({"bias": bias} if has_bias else {})},
                                  divide_attrs=("nf",))
    return LocalShardParallel({"weight": Shard(0), **({"bias": Replicate()} if has_bias else {})},
                              reduce_output=True,
                              bias_after_reduce="bias" if has_bias else None, whole_input=False)
