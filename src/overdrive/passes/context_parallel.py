"""context_parallel: shard the sequence across the "cp" mesh dim; attention sees every key.

Data. ``shard_sequence(batch, env)`` (the runtime's ``rt.shard_sequence``) cuts every
``(batch, seq, ...)`` tensor of a batch into ``2·cp`` chunks along the sequence and gives
cp rank ``r`` chunks ``r`` and ``2·cp-1-r``: under a causal mask the early chunks are cheap
and the late ones expensive, so every rank gets the same amount of attention work. It adds
the matching ``position_ids`` so RoPE sees each token's true position.

Attention. Each repeated block (the root when there are none) runs its forward under a
``TorchFunctionMode`` that redirects ``F.scaled_dot_product_attention``:

- on CUDA to torch's context-parallel SDPA (ring attention through DTensor, the
  head-tail load balance above);
- elsewhere (CPU/gloo: torch has no context-parallel kernel there) to an all-gather-KV
  attention, the scheme Llama 3 trained with: keys and values are all-gathered across the
  cp ranks (autograd-aware: their gradients are reduce-scattered back) and each rank's
  queries attend to them under the causal mask of their true positions.

Why a mode entered in the blocks' forward: the model's own code stays untouched (no
module swap, no monkey-patching of ``torch.nn.functional``), only SDPA calls made inside the
model are affected, and activation checkpointing's recompute — which calls the block again
during backward, outside the model's forward — runs under the same redirect.

Refused rather than silently changed. At check, before the model is touched, whatever
the model declares: sliding-window attention, bidirectional attention (a config with
``is_causal=False`` or ``is_encoder_decoder=True``, attention modules with
``is_causal=False`` — transformers' encoders), an ``attn_implementation`` other than
sdpa. At the SDPA call, a runtime guard for what only the call shows: an explicit
``attn_mask`` (e.g. a padding ``attention_mask`` passed with the batch) or
``is_causal=False``. After a block's forward: attention that never called SDPA. In
``shard_sequence``: a sequence not divisible by ``2·cp``. The runtime refusals happen
after the model was changed (rebuild it, or feed causal, unpadded batches).

Loss: a causal LM that shifts its labels (overdrive's Llama, transformers') gets them
shifted before the split, and each rank's loss is its summed token losses over the
batch's target count ÷ cp, so the cp average is the exact unsharded mean.

Gradients: each cp rank's loss covers its own tokens. When the plan has no data-parallel
engine the pass averages gradients over the cp group itself; fsdp (which shards over
``dp_shard_cp``) and ddp (over ``dp_cp``) do it as part of their reduction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..causal_lm import is_transformers_causal_lm, takes_shift_labels
from ..errors import PlanError
from ..plan_spec import ContextParallelConfig
from ..rewrite.contract import Applied, Decision, MemoryEffect, Pass, PassContext
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import register_pass

SDPA = F.scaled_dot_product_attention


# --------------------------------------------------------------------------- sequence


def balanced_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions held by cp rank ``rank``: chunks ``rank`` and ``2·cp-1-rank`` of ``2·cp``."""
    if seq_len % (2 * cp):
        raise PlanError(
            f"parallel.cp={cp}: the sequence length {seq_len} is not divisible by 2·cp = "
            f"{2 * cp}; pad sequences to a multiple of {2 * cp} or choose another cp"
        )
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


def cp_rank(env: Any) -> int:
    return env.mesh["cp"].get_local_rank()


def shard_sequence(batch: Any, env: Any, seq_dim: int = 1, causal_lm: bool = False,
                   attention_mask: bool = False) -> Any:
    """This cp rank's load-balanced slice of ``batch`` along ``seq_dim``.

    ``batch`` is a tensor or a mapping (e.g. ``{"input_ids", "labels"}``); every tensor
    whose ``seq_dim`` has the batch's sequence length is sliced, other values pass through.
    A mapping without ``position_ids`` gets them. Bare tensors and tuple/list batches
    (TensorDataset) are refused: there is no place to put the positions, and a model
    computing its own (RoPE from ``arange``) would be silently wrong.

    ``causal_lm``: the model's loss shifts ``labels`` itself (overdrive's Llama,
    transformers' causal LMs) — which, inside one rank's non-contiguous head+tail slice,
    would give the tokens at chunk boundaries the wrong targets. So the full-length labels
    are shifted here (``labels[..., 1:]``, -100 at the end) and handed over as
    ``shift_labels``; ``num_items_in_batch`` (the batch's target count ÷ cp, or the
    caller's ÷ cp) makes each rank's loss its token-weighted share of the unsharded mean,
    so the cp average of losses and gradients equals the unsharded one exactly, however
    the ignored (-100) targets fall. ``attention_mask``: add an all-ones mask (when none is
    given), which stops transformers from reading the non-contiguous ``position_ids`` as
    packed sequences and building a block mask. Without ``causal_lm`` labels are taken as
    already aligned with the inputs and only sliced.
    """
    cp = env.parallel.cp
    if cp == 1:
        return batch
    if not isinstance(batch, Mapping):
        raise PlanError(
            f"parallel.cp={cp}: rt.shard_sequence got a {type(batch).__name__} batch; it "
            "needs a mapping such as {'input_ids': ..., 'labels': ...} so it "
            "can add the true position_ids of this rank's tokens; have the DataLoader yield "
            "dicts (e.g. a Dataset returning dicts, or a collate_fn building one) or set cp=1")
    ref = batch.get("input_ids")
    if not isinstance(ref, torch.Tensor):
        ref = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > seq_dim)
    seq_len = ref.shape[seq_dim]
    balanced_positions(seq_len, cp, 0)  # refuses a bad length before touching the mesh
    if causal_lm:
        batch = _causal_lm_inputs(batch, ref, cp, seq_dim, attention_mask)
    idx = balanced_positions(seq_len, cp, cp_rank(env), ref.device)
    out = {k: v.index_select(seq_dim, idx.to(v.device))
           if isinstance(v, torch.Tensor) and v.ndim > seq_dim and v.shape[seq_dim] == seq_len
           else v for k, v in batch.items()}
    if "position_ids" not in out:
        out["position_ids"] = idx.unsqueeze(0).expand(ref.shape[0], -1)
    return type(batch)(out) if not isinstance(batch, dict) else out


def _causal_lm_inputs(batch: Mapping, ref: torch.Tensor, cp: int, seq_dim: int,
                      attention_mask: bool) -> dict:
    """The full-length extras a label-shifting causal LM needs before the batch is sliced."""
    out = dict(batch)
    labels = out.get("labels")
    if isinstance(labels, torch.Tensor) and "shift_labels" not in out:
        last = torch.full_like(labels.narrow(seq_dim, 0, 1), -100)
        out["shift_labels"] = torch.cat([labels.narrow(seq_dim, 1, labels.shape[seq_dim] - 1),
                                         last], dim=seq_dim)
    targets = out.get("shift_labels")
    if "num_items_in_batch" in out:
        out["num_items_in_batch"] = out["num_items_in_batch"] / cp
    elif isinstance(targets, torch.Tensor):
        out["num_items_in_batch"] = (targets != -100).sum() / cp
    if attention_mask and "attention_mask" not in out and "inputs_embeds" not in out:
        out["attention_mask"] = torch.ones(ref.shape[:seq_dim + 1], dtype=torch.long,
                                           device=ref.device)
    return out


# --------------------------------------------------------------------------- attention


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group,
                           cp: int, rank: int, dropout_p: float = 0.0, scale=None,
                           enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of this rank's load-balanced queries against all keys/values.

    q, k, v: ``(batch, heads, local_seq, head_dim)``, sequences laid out by
    ``balanced_positions``.
    """
    from torch.distributed._functional_collectives import all_gather_single_autograd

    local = q.shape[-2]
    seq_len = local * cp

    def gather(t: torch.Tensor) -> torch.Tensor:  # sequence first: funcol gathers dim 0
        full = all_gather_single_autograd(t.movedim(-2, 0).contiguous(), 0, group)
        return full.movedim(0, -2)

    k_all, v_all = gather(k), gather(v)
    pos_q = balanced_positions(seq_len, cp, rank, q.device)
    pos_kv = torch.cat([balanced_positions(seq_len, cp, r, q.device) for r in range(cp)])
    mask = pos_kv.unsqueeze(0) <= pos_q.unsqueeze(1)  # (local, seq_len): True = attend
    return SDPA(q, k_all, v_all, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                enable_gqa=enable_gqa)


def torch_cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mesh,
                       dropout_p: float = 0.0, scale=None, enable_gqa: bool = False):
    """torch's context-parallel SDPA (CUDA): DTensors sharded on the sequence dispatch to
    ring attention; its head-tail load balance matches ``balanced_positions``."""
    from torch.distributed.tensor import DTensor, Shard

    if enable_gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k, v = (DTensor.from_local(t.contiguous(), mesh, [Shard(2)], run_check=False)
               for t in (q, k, v))
    out = SDPA(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    return out.to_local()


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class ContextParallelAttention(TorchFunctionMode):
    """Redirects ``F.scaled_dot_product_attention`` to context-parallel attention."""

    def __init__(self, mesh, cp: int, use_torch_cp: bool):
        super().__init__()
        self.mesh, self.cp, self.use_torch_cp = mesh, cp, use_torch_cp
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        q, k, v, mask, dropout_p, is_causal, scale, gqa = _sdpa_args(*args, **kwargs)
        self._refuse(q, k, mask, is_causal)
        self.calls += 1
        if self.use_torch_cp:
            return torch_cp_attention(q, k, v, mesh=self.mesh, dropout_p=dropout_p,
                                      scale=scale, enable_gqa=gqa)
        return allgather_kv_attention(q, k, v, group=self.mesh.get_group(), cp=self.cp,
                                      rank=self.mesh.get_local_rank(), dropout_p=dropout_p,
                                      scale=scale, enable_gqa=gqa)

    def _refuse(self, q, k, mask, is_causal) -> None:
        cp = self.cp
        if mask is not None or not is_causal:
            what = "an explicit attn_mask" if mask is not None else "is_causal=False"
            raise PlanError(
                f"parallel.cp={cp}: context parallelism supports causal attention only, but "
                f"scaled_dot_product_attention got {what}; call it with is_causal=True and "
                "no mask (padding masks and bidirectional attention are not supported), "
                "or set cp=1"
            )
        if q.shape[-2] != k.shape[-2] or q.shape[-2] % 2:
            raise PlanError(
                f"parallel.cp={cp}: attention got a local sequence of {q.shape[-2]} queries "
                f"and {k.shape[-2]} keys; feed batches through rt.shard_sequence (the full "
                f"sequence must be divisible by 2·cp = {2 * cp})"
            )


def run_under(module: nn.Module, name: str, make_mode) -> None:
    """Make ``module``'s forward run under a fresh context-parallel attention mode."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_cp(*args, **kwargs):
        mode = make_mode()
        with mode:
            out = forward(*args, **kwargs)
        if mode.calls == 0:
            raise PlanError(
                f"context_parallel: {name or type(module).__name__} ran without calling "
                "F.scaled_dot_product_attention; context parallelism can only shard attention "
                "computed with it (for transformers models use attn_implementation='sdpa')"
            )
        return out

    module.forward = forward_cp


def average_grads_over(model: nn.Module, mesh) -> int:
    """Average each gradient over ``mesh``'s group as it is accumulated; returns the count."""
    import torch.distributed as dist

    group, size = mesh.get_group(), mesh.size()

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        g = g._local_tensor if hasattr(g, "_local_tensor") else g
        dist.all_reduce(g, group=group)
        g.div_(size)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_post_accumulate_grad_hook(hook)
    return len(params)


# --------------------------------------------------------------------------- checks


def _sliding_window(graph: ModuleGraph) -> str | None:
    cfg = getattr(graph.model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if cfg is not None and getattr(cfg, "sliding_window", None) and \
            getattr(cfg, "use_sliding_window", True) is not False:
        return f"config.sliding_window={cfg.sliding_window}"
    for name in graph.names():
        window = getattr(graph.module(name), "sliding_window", None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            return f"{name}.sliding_window={window}"
    return None


def _bidirectional(graph: ModuleGraph) -> str | None:
    """What in the model says its attention is not causal, or None."""
    cfg = getattr(graph.model, "config", None)
    if getattr(cfg, "is_encoder_decoder", None) is True:
        return "config.is_encoder_decoder=True"
    if getattr(cfg, "is_causal", None) is False:
        return "config.is_causal=False"
    for name in graph.names():
        if getattr(graph.module(name), "is_causal", None) is False:
            return f"{name}.is_causal=False"
    return None


def _attn_implementation(graph: ModuleGraph) -> str | None:
    cfg = getattr(graph.model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class ContextParallelDecision(Decision):
    """``modules``: where attention is redirected (the blocks, else the root);
    ``attention``: which kernel (by device); ``average_grads``: no data-parallel engine
    averages the cp ranks' gradients, so the pass does."""

    cp: int
    attention: str
    average_grads: bool


@register_pass("context_parallel", config=ContextParallelConfig, after=("tensor_parallel",),
               before=("checkpointing",))
class ContextParallel(Pass):
    def check(self, ctx: PassContext) -> ContextParallelDecision:
        graph, cp = ctx.graph, ctx.cfg.size
        window = _sliding_window(graph)
        if window is not None:
            raise PlanError(
                f"parallel.cp={cp}: the model uses sliding-window attention ({window}); "
                "context parallelism supports full causal attention only; set cp=1"
            )
        bidirectional = _bidirectional(graph)
        if bidirectional is not None:
            raise PlanError(
                f"parallel.cp={cp}: the model's attention is not causal ({bidirectional}); "
                "context parallelism supports causal (decoder) attention only; set cp=1"
            )
        impl = _attn_implementation(graph)
        if impl is not None and impl != "sdpa":
            raise PlanError(
                f"parallel.cp={cp}: the model's attention implementation is {impl!r}; context "
                "parallelism redirects F.scaled_dot_product_attention, so build the model "
                "with attn_implementation='sdpa' or set cp=1"
            )
        env = ctx.env
        attention = ("cuda ring SDPA or all-gather-KV (by device)" if env.dry_run else
                     "torch ring SDPA" if env.device.type == "cuda" else "all-gather-KV")
        average = ctx.plan.data_parallel is None
        notes = [f"cp={cp}: sequence split in {2 * cp} chunks (rank r holds r and "
                 f"{2 * cp - 1}-r); attention: {attention}"]
        if is_transformers_causal_lm(graph.model):
            notes.append("transformers causal LM: labels shifted before the split "
                         "(shift_labels), losses weighted by target count (num_items_in_batch)")
        if average:
            notes.append("no data-parallel engine: gradients averaged over the cp group")
        return ContextParallelDecision(
            modules=graph.blocks() or [""], notes=notes, cp=cp, attention=attention,
            average_grads=average,
            details={"cp": cp, "attention": attention, "load_balance": "head-tail"},
            memory=MemoryEffect(activation_split=cp))

    def apply(self, model: nn.Module, decision: ContextParallelDecision,
              ctx: PassContext) -> Applied:
        env, cp = ctx.env, decision.cp
        mesh = env.mesh["cp"]
        use_torch_cp = env.device.type == "cuda"
        if use_torch_cp:
            from torch.distributed.tensor.experimental._attention import (
                _cp_options, _enable_context_parallel_dispatcher)
            _enable_context_parallel_dispatcher()  # process-wide: DTensor SDPA → ring attention
            _cp_options.enable_load_balance = True  # head-tail, as balanced_positions lays out
        make_mode = functools.partial(ContextParallelAttention, mesh, cp, use_torch_cp)
        for name in decision.modules:
            run_under(ctx.graph.module(name), name, make_mode)
        if decision.average_grads:
            average_grads_over(model, mesh)
        transformers_lm = is_transformers_causal_lm(model)
        causal_lm = transformers_lm or takes_shift_labels(model)
        split = functools.partial(shard_sequence, env=env, causal_lm=causal_lm,
                                  attention_mask=transformers_lm)
        rec = self.preview(decision, ctx)
        if causal_lm:
            rec.note("causal LM: labels shifted before the split (shift_labels), "
                     "losses weighted by target count (num_items_in_batch)")
        return Applied(rec, batch_transform=split)
