"""tensor_parallel: shard Linear / Embedding weights over the "tp" mesh dim with DTensor.

The pass resolves ``Plan.tp_plan`` into ``{qualified module name: style}`` and hands each
entry to torch's ``parallelize_module`` on ``env.mesh["tp"]``. ``tp_plan="auto"`` takes the
model's own plan when it carries one (transformers: ``model._tp_plan`` or
``config.base_model_tp_plan``), else a Llama-style default found from module names, laid
out as torchtitan does:

    q/k/v, gate/up projections   colwise            weight rows split, output sharded
    o, down projections          rowwise            weight columns split, outputs summed
    token embedding              embedding_rowwise  vocabulary rows split
    lm_head                      colwise_rep        vocabulary split, logits gathered
    norms (sequence_parallel)    sequence_parallel  activations sharded on the sequence

With ``Parallel(sequence_parallel=True)`` the residual stream stays sharded on the
sequence dim between sublayers; the modules that own colwise layers (attention, mlp) get a
``PrepareModuleInput`` that all-gathers their first input. On a transformers model's own
plan the embedding output stays whole instead (the model derives positions and masks from
its length) and the first block of each stack splits the sequence. When the fp8 pass left torchao
``Float8Linear`` modules with tensorwise scaling, torchao's float8 TP styles are used so
the all-gathers run in float8.

Attention that reshapes with ``-1`` heads and a stored ``head_dim`` needs nothing else;
for attention that reshapes with a stored head count, ``Plan.tp_divide_attrs`` names the
integer attributes (e.g. ``("n_heads", "n_kv_heads")``) to divide by tp on the modules
whose children are sharded.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import PlanError
from ..plan_spec import TP_STYLES, Plan, TensorParallelConfig
from ..rewrite.contract import Applied, Decision, MemoryEffect, Pass, PassContext
from ..rewrite.graph import ModuleGraph, parameter_owners
from ..rewrite.manager import register_pass
from .tp_local import (CONV1D_COLWISE, CONV1D_ROWWISE, EXPERTS, LOCAL_STYLES, fused_factor,
                       is_conv1d, is_grouped_experts, make_local_style, shard_size_error)

# transformers' style names -> ours (None: the module stays as it is)
HF_STYLES: dict[str, str | None] = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "colwise_rep",
    "colwise_gather_output": "colwise_rep",
    "rowwise_rep": "rowwise_rep",
    "rowwise_split_input": "rowwise_rep",
    "embedding_rowwise": "embedding_rowwise",
    "sequence_parallel": "sequence_parallel",
    "replicate": None,
}
COLWISE_NAMES = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "wq", "wk", "wv", "w1",
                 "w3", "q", "k", "v", "query", "key", "value", "fc1", "linear1", "wi", "wi_0",
                 "wi_1"}
ROWWISE_NAMES = {"o_proj", "down_proj", "out_proj", "wo", "w2", "o", "fc2", "linear2"}
CONV1D_COLWISE_NAMES = {"c_attn", "c_fc"}  # transformers' Conv1D (GPT-2)
CONV1D_ROWWISE_NAMES = {"c_proj"}
SHARDING_STYLES = {"colwise", "rowwise", "colwise_rep", "rowwise_rep", "embedding_rowwise",
                   *LOCAL_STYLES}
HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads", "n_head")
KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_heads")


# --------------------------------------------------------------------------- resolving


def model_tp_plan(model: nn.Module) -> dict[str, str] | None:
    """The model's own plan with globs relative to ``model`` (transformers convention)."""
    own = getattr(model, "_tp_plan", None)
    if isinstance(own, Mapping) and own:
        return dict(own)
    base = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not isinstance(base, Mapping) or not base:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
    return {prefix + glob: style for glob, style in base.items()}


def resolve_tp_plan(graph: ModuleGraph, plan: Plan) -> tuple[dict[str, str], list[str]]:
    """``({module name: style}, notes)``; raises PlanError for what cannot be honoured."""
    sp = plan.parallel.sequence_parallel
    if plan.tp_plan is None:
        raise PlanError(
            f"tp_plan=None with parallel.tp={plan.parallel.tp}: nothing says what to shard; "
            "use tp_plan='auto' or a dict {module glob: style}"
        )
    if isinstance(plan.tp_plan, Mapping):
        return _explicit_plan(graph, plan.tp_plan), []
    own = model_tp_plan(graph.model)
    if own is not None:
        styles, notes = _model_plan(graph, own)
        return (_sequence_parallel_on_model_plan(graph, styles), notes) if sp else (styles, notes)
    return _default_plan(graph, sp)


def _explicit_plan(graph: ModuleGraph, tp_plan: Mapping[str, str]) -> dict[str, str]:
    styles: dict[str, str] = {}
    for glob, style in tp_plan.items():
        hits = graph.match(glob)
        if not hits:
            raise PlanError(
                f"tp_plan[{glob!r}] matches no module of {type(graph.model).__name__}; use "
                f"qualified names or globs such as {_example(graph)!r}"
            )
        styles.update((h, style) for h in hits)
    _refuse_tied(graph, styles)
    return styles


def _refuse_tied(graph: ModuleGraph, styles: dict[str, str]) -> None:
    """An explicit plan that shards a module whose weight is shared with another would
    untie them (each gets its own DTensor): refused, naming both."""
    owners = parameter_owners(graph.model)
    for name, style in styles.items():
        if style not in SHARDING_STYLES:
            continue
        for pname, p in graph.module(name).named_parameters(recurse=False):
            others = sorted(owners[id(p)] - {name})
            if others:
                raise PlanError(
                    f"tp_plan: {name!r} ({style}) has its {pname} tied to {others[0]!r}; "
                    "sharding it would untie them and train two copies. Leave "
                    f"{name!r} out of tp_plan (tp_plan='auto' leaves tied modules "
                    "alone), or untie the weights before od.accelerate")


def _model_plan(graph: ModuleGraph, own: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    styles, notes = {}, []
    experts = [g for g, s in own.items() if _is_moe_style(s, g)]
    for glob, hf_style in own.items():
        hits = graph.match(glob)
        if not hits and any(glob.startswith(e + ".") for e in experts):
            continue  # a parameter of grouped experts: the experts style shards it
        if not hits:
            notes.append(f"model tp plan entry {glob!r} matches no module: skipped")
            continue
        if hf_style not in HF_STYLES and _is_moe_style(hf_style, glob) and \
                all(is_grouped_experts(graph.module(h)) for h in hits):
            styles.update((h, EXPERTS) for h in hits)
            continue
        if hf_style not in HF_STYLES and _is_moe_style(hf_style, glob):
            notes.append(f"{glob} ({hf_style}): the experts stay whole on every tp rank "
                         "(expert sharding is not supported yet); attention is sharded")
            continue
        if hf_style not in HF_STYLES:
            raise PlanError(
                f"tp_plan='auto': the model's own plan gives {glob!r} the style {hf_style!r}, "
                "which overdrive cannot map (the transformers styles it maps: "
                f"{', '.join(HF_STYLES)}); give tp_plan as a dict {{glob: style}} with "
                f"overdrive's styles ({', '.join(TP_STYLES)})"
            )
        if HF_STYLES[hf_style] is not None:
            styles.update((h, HF_STYLES[hf_style]) for h in hits)
    return _untie(graph, styles, notes)


def _sequence_parallel_on_model_plan(graph: ModuleGraph, styles: dict[str, str]) -> dict[str, str]:
    """Sequence parallel on top of a transformers plan. Such a model derives positions,
    rotary tables and the causal mask from the embedding output's length at the model
    level, so the embedding output stays whole and the first block of each stack splits
    its input on the sequence (``sequence_split``); the norms run sequence-parallel, and
    the attention/MLP modules all-gather their input (any call form: transformers passes
    ``hidden_states=`` by keyword)."""
    experts = [n for n, s in styles.items() if s == EXPERTS]
    if experts:
        raise PlanError(
            f"parallel.sequence_parallel=True with grouped experts ({experts[0]}): the router "
            "and the experts' tp style (output summed over tp) read whole token activations, "
            "not a sequence-sharded stream; use sequence_parallel=False with this model")
    out = {n: ("embedding_rowwise_rep" if s == "embedding_rowwise" else s)
           for n, s in styles.items()}
    for group in graph.block_groups():
        out[group[0]] = "sequence_split"
    out.update((n, "sequence_parallel_local") for n in graph.names()
               if n and _is_norm(graph.module(n)))
    return out


def _is_moe_style(style: str, glob: str) -> bool:
    """transformers' expert-parallel / grouped-experts styles (``moe_tp_experts``,
    ``ep_router``, ``grouped_gemm``…) or any style given to an ``experts`` module. Grouped
    experts (3-D ``gate_up_proj`` / ``down_proj``) are sharded on their hidden dim; other
    expert layouts stay whole with a note."""
    return style.startswith(("moe", "ep_", "grouped")) or \
        glob.rsplit(".", 1)[-1] == "experts"


def _default_plan(graph: ModuleGraph, sp: bool) -> tuple[dict[str, str], list[str]]:
    styles: dict[str, str] = {}
    notes: list[str] = []
    inside: set[str] = set()
    for block in graph.blocks():
        inside.update(graph.subtree(block))
        for unit in _block_units(graph, block, notes):
            styles.update(unit)
        if sp:
            styles.update((n, "sequence_parallel") for n in graph.subtree(block)
                          if _is_norm(graph.module(n)))
    notes += _drop_inconsistent_classes(graph, styles)
    outside = [n for n in graph.names() if n and n not in inside]
    embeds = [n for n in outside if isinstance(graph.module(n), nn.Embedding)]
    if len(embeds) == 1:
        styles[embeds[0]] = "embedding_rowwise"
        vocab = graph.module(embeds[0]).num_embeddings
        heads = [n for n in outside if isinstance(graph.module(n), nn.Linear)
                 and graph.module(n).out_features == vocab]
        if len(heads) == 1:
            styles[heads[0]] = "colwise_rep"
    if sp:
        styles.update((n, "sequence_parallel") for n in outside if _is_norm(graph.module(n)))
    return _untie(graph, styles, notes)


def _linear_role(graph: ModuleGraph, name: str) -> str | None:
    """'colwise' / 'rowwise' for a Linear (or transformers Conv1D) named like an attention
    or MLP projection."""
    parent, _, leaf = name.rpartition(".")
    if is_conv1d(graph.module(name)):
        return "colwise" if leaf in CONV1D_COLWISE_NAMES else \
            "rowwise" if leaf in CONV1D_ROWWISE_NAMES else None
    if not isinstance(graph.module(name), nn.Linear):
        return None
    if leaf in COLWISE_NAMES:
        return "colwise"
    if leaf in ROWWISE_NAMES:
        return "rowwise"
    if leaf == "dense":  # BERT: intermediate.dense widens, output.dense narrows
        owner = parent.rpartition(".")[2]
        return {"intermediate": "colwise", "output": "rowwise"}.get(owner)
    return None


def _block_units(graph: ModuleGraph, block: str, notes: list[str]) -> list[dict[str, str]]:
    """The block's projections as units: column-parallel layers and the row-parallel
    layer that consumes their sharded output. Projections under one module form a unit
    whatever their order (q/k/v/o, gate/up/down, torchtitan's w1/w2/w3, linear1/linear2);
    a module holding only column-parallel ones is closed by the next module holding only
    row-parallel ones (BERT: attention.self → attention.output, intermediate → output).
    A row-parallel layer nothing sharded feeds (nn.MultiheadAttention's out_proj: its
    input projection is a raw parameter) stays whole, and so does a unit whose span holds
    a module with weights that is neither a projection nor a norm (T5's relative
    position bias, computed per head)."""
    names = graph.subtree(block)
    by_owner: dict[str, dict[str, list[str]]] = {}
    for name in names:
        role = _linear_role(graph, name)
        if role is not None:
            roles = by_owner.setdefault(name.rpartition(".")[0], {"colwise": [], "rowwise": []})
            roles[role].append(name)
    units: list[dict[str, str]] = []
    pending: list[str] = []
    for roles in by_owner.values():
        col, row = roles["colwise"], roles["rowwise"]
        if col and not row:
            pending += col
            continue
        if not col:
            if not pending:
                notes.append(f"{', '.join(row)} not sharded: no column-parallel projection "
                             "feeds it")
                continue
            col, pending = pending, []
        unit = {**{n: "colwise" for n in col}, **{n: "rowwise" for n in row}}
        foreign = _foreign_weights(graph, names, list(unit))
        if foreign:
            notes.append(f"{', '.join(unit)} not sharded: {foreign} inside that "
                         "attention/MLP has weights the plan cannot shard")
            continue
        units.append({n: _conv1d_style(graph, n, s) for n, s in unit.items()})
    if pending:
        notes.append(f"{', '.join(pending)} not sharded: no row-parallel layer consumes them")
    return units


def _conv1d_style(graph: ModuleGraph, name: str, style: str) -> str:
    if not is_conv1d(graph.module(name)):
        return style
    return CONV1D_COLWISE if style == "colwise" else CONV1D_ROWWISE


def _foreign_weights(graph: ModuleGraph, names: list[str], unit: list[str]) -> str | None:
    """A module with own parameters under the unit's common parent, from the unit's first
    layer on, that is neither one of the unit's projections nor a norm."""
    common = _common_parent(unit)
    start = min(names.index(n) for n in unit)
    for name in names[start:]:
        if not (name.startswith(common + ".") or not common) or name in unit:
            continue
        module = graph.module(name)
        if graph.g.nodes[name]["params"] and not _is_norm(module) \
                and _linear_role(graph, name) is None:
            return name
    return None


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common[:len(min(parts, key=len)) - 1])


def _drop_inconsistent_classes(graph: ModuleGraph, styles: dict[str, str]) -> list[str]:
    """One attention class is sharded everywhere or nowhere: T5's first block owns the
    relative bias its siblings reuse, so sharding the other blocks' heads would not fit."""
    by_owner: dict[str, list[str]] = {}
    for name in list(styles):
        by_owner.setdefault(name.rpartition(".")[0], []).append(name)
    all_owners: dict[type, list[str]] = {}
    for block in graph.blocks():
        for name in graph.subtree(block):
            if _linear_role(graph, name) is not None:
                owner = name.rpartition(".")[0]
                all_owners.setdefault(type(graph.module(owner)), [])
                if owner not in all_owners[type(graph.module(owner))]:
                    all_owners[type(graph.module(owner))].append(owner)
    notes = []
    for cls, owners in all_owners.items():
        sharded = [o for o in owners if o in by_owner]
        if sharded and len(sharded) != len(owners):
            for o in sharded:
                for n in by_owner[o]:
                    del styles[n]
            notes.append(f"{cls.__name__} not sharded: {len(owners) - len(sharded)} of its "
                         f"{len(owners)} instances cannot be, and they share activations")
    return notes


def _untie(graph: ModuleGraph, styles: dict[str, str], notes: list[str]):
    """Auto plans leave modules whose weights are shared with another module alone."""
    owners = parameter_owners(graph.model)
    for name in list(styles):
        params = graph.module(name).parameters(recurse=False)
        if styles[name] in SHARDING_STYLES and any(len(owners[id(p)]) > 1 for p in params):
            del styles[name]
            notes.append(f"{name} skipped: its weight is tied to another module")
    return styles, notes


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm"))


def _unshardable(graph: ModuleGraph) -> str:
    """Why nothing was found: projections DTensor's Linear styles cannot shard."""
    conv1d = [n for n in graph.names() if type(graph.module(n)).__name__ == "Conv1D"]
    if conv1d:
        return (f": its projections ({conv1d[0]}, …) are transformers' Conv1D (a transposed "
                "weight, q/k/v fused in one), which the Linear styles cannot shard")
    return ""


def _example(graph: ModuleGraph) -> str:
    blocks = graph.blocks()
    return f"{blocks[0].rpartition('.')[0]}.*.<name>" if blocks else "layers.*.attn.q_proj"


def _sp_owners(graph: ModuleGraph, styles: dict[str, str]) -> list[str]:
    """Modules owning colwise layers: their input is all-gathered under sequence parallel."""
    owners = []
    for name, style in styles.items():
        parent = name.rpartition(".")[0]
        if style == "colwise" and parent not in styles and parent not in owners:
            owners.append(parent)
    return owners


def _owners_of_sharded(styles: dict[str, str]) -> list[str]:
    return sorted({n.rpartition(".")[0] for n, s in styles.items() if s in SHARDING_STYLES})


# --------------------------------------------------------------------------- checks


def head_counts(graph: ModuleGraph) -> dict[str, int]:
    """Attention and key/value head counts from the model's config, else from the q/k
    projections' out_features ÷ the attention module's ``head_dim``; {} when unknown."""
    model = graph.model
    for cfg in (getattr(model, "config", None), getattr(model, "cfg", None)):
        if cfg is None:
            continue
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        heads = _first_int(cfg, HEAD_ATTRS)
        if heads:
            return {"heads": heads, "kv_heads": _first_int(cfg, KV_HEAD_ATTRS) or heads}
    for name in graph.names():
        module = graph.module(name)
        hd, q, k = (getattr(module, a, None) for a in ("head_dim", "q_proj", "k_proj"))
        if isinstance(hd, int) and hd > 0 and isinstance(q, nn.Linear):
            kv = k.out_features // hd if isinstance(k, nn.Linear) else q.out_features // hd
            return {"heads": q.out_features // hd, "kv_heads": kv}
    return {}


def _first_int(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _check_heads(graph: ModuleGraph, tp: int) -> None:
    counts = head_counts(graph)
    if not counts or all(v % tp == 0 for v in counts.values()):
        return
    g = math.gcd(*counts.values())
    valid = [d for d in range(1, g + 1) if g % d == 0]
    raise PlanError(
        f"parallel.tp={tp} does not divide the attention heads ({counts['heads']} heads, "
        f"{counts['kv_heads']} key/value heads); valid tp values: {valid}"
    )


def _check_modules(graph: ModuleGraph, styles: dict[str, str]) -> None:
    for name, style in styles.items():
        module = graph.module(name)
        if style in LOCAL_STYLES:
            fits = is_grouped_experts(module) if style == EXPERTS else is_conv1d(module)
            if not fits:
                raise PlanError(
                    f"tp_plan: {name!r} is a {type(module).__name__}; style {style!r} needs "
                    + ("grouped experts (3-D gate_up_proj/down_proj)" if style == EXPERTS
                       else "a transformers Conv1D"))
            continue
        want = nn.Embedding if style == "embedding_rowwise" else nn.Linear
        if style in SHARDING_STYLES and not isinstance(module, want):
            raise PlanError(
                f"tp_plan: {name!r} is a {type(module).__name__}; style {style!r} needs an "
                f"nn.{want.__name__} (colwise/rowwise styles shard Linear weights, "
                "embedding_rowwise an Embedding's rows)"
            )


def _check_local_sizes(graph: ModuleGraph, styles: dict[str, str], tp: int) -> None:
    for name, style in styles.items():
        if style in LOCAL_STYLES:
            bad = shard_size_error(name, graph.module(name), style, tp)
            if bad:
                raise PlanError(f"parallel.tp={tp} does not divide {bad}; choose a tp that "
                                "divides it")


def _fused_split_owners(graph: ModuleGraph, styles: dict[str, str]) -> list[str]:
    """GPT-2's attention splits c_attn's output with ``split_size`` (its width): on each
    rank the fused output holds that rank's heads, so the split becomes ``split_size // tp``
    (the decision's ``divide``)."""
    owners = []
    for name, style in styles.items():
        if style == CONV1D_COLWISE and fused_factor(name, graph.module(name)) > 1:
            owner = name.rpartition(".")[0]
            if isinstance(getattr(graph.module(owner), "split_size", None), int):
                owners.append(owner)
    return owners


def _check_divide_attrs(graph: ModuleGraph, styles: dict[str, str], plan: Plan) -> None:
    tp = plan.parallel.tp
    owners = _owners_of_sharded(styles)
    for attr in plan.tp_divide_attrs:
        found = [(o, getattr(graph.module(o), attr)) for o in owners
                 if isinstance(getattr(graph.module(o), attr, None), int)]
        if not found:
            shown = ", ".join(o or "<root>" for o in owners[:4]) + (
                ", …" if len(owners) > 4 else "")
            raise PlanError(
                f"tp_divide_attrs: no module owning a sharded layer has an integer attribute "
                f"{attr!r} (owners: {shown or 'none'}); name the head-count attributes those "
                "modules store, or drop tp_divide_attrs when attention reshapes with -1"
            )
        for owner, value in found:
            if value % tp:
                raise PlanError(
                    f"parallel.tp={tp} does not divide {owner}.{attr}={value} "
                    f"(tp_divide_attrs); choose a tp that divides it"
                )


def _check_sequence_parallel(graph: ModuleGraph, styles: dict[str, str]) -> None:
    have = set(styles.values())
    if "sequence_split" in have:  # on the model's own plan
        if "colwise_rep" not in have:
            raise PlanError(
                "parallel.sequence_parallel=True needs the lm_head gathered (colwise_rep) in "
                f"the tp plan to leave the sequence-sharded stream; found {sorted(have)}; use "
                "sequence_parallel=False")
        return
    if not {"embedding_rowwise", "colwise_rep"} <= have or "sequence_parallel" not in have:
        raise PlanError(
            "parallel.sequence_parallel=True needs the token embedding (embedding_rowwise), "
            "the lm_head (colwise_rep) and the norms (sequence_parallel) in the tp plan, so "
            "the activations enter and leave the blocks sequence-sharded; found styles "
            f"{sorted(have)} (tied embeddings are not sharded); use sequence_parallel=False"
        )
    blocks = set(graph.blocks())
    for owner in _sp_owners(graph, styles):
        if owner in blocks or owner == "":
            raise PlanError(
                f"parallel.sequence_parallel=True: colwise layers directly under {owner!r} "
                "need an attention/mlp module around them to all-gather the sequence; use "
                "sequence_parallel=False"
            )


def collective_backend(env: Any) -> str:
    """The backend the collectives run on; a dry run (od.inspect) answers for this
    machine (nccl when it has CUDA), as the fp8 pass resolves its backend there."""
    if env.dry_run:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return env.backend


def _check_fp8_backend(plan: Plan) -> None:
    if plan.fp8 is not None and plan.fp8.backend == "te":
        raise PlanError(
            f"fp8.backend='te' with parallel.tp={plan.parallel.tp} is not supported: "
            "Transformer Engine's te.Linear is not an nn.Linear, so DTensor tensor "
            "parallelism cannot shard it; use fp8.backend='torchao' with tp (its "
            "Float8Linear layers shard with torchao's float8 TP styles), or tp=1"
        )


def _verify_after_earlier_passes(graph: ModuleGraph, styles: dict[str, str]) -> None:
    """The styles were resolved in check, before the fp8 pass swapped modules: every
    module they shard must still be one DTensor can shard (fp8.backend='auto' may have
    picked Transformer Engine on this machine)."""
    try:
        _check_modules(graph, styles)
    except PlanError as err:
        raise PlanError(
            f"tensor_parallel: a pass before it replaced a module the tp plan shards ({err}); "
            "with tp use fp8.backend='torchao', whose Float8Linear is an nn.Linear"
        ) from None


# --------------------------------------------------------------------------- styles


def _is_float8_tensorwise(module: nn.Module) -> bool:
    if type(module).__name__ != "Float8Linear":  # no torchao import (and its noise) for others
        return False
    try:
        from torchao.float8.float8_linear import Float8Linear
    except Exception:  # noqa: BLE001 - no (working) torchao: no Float8Linear either
        return False
    if not isinstance(module, Float8Linear):
        return False
    from torchao.float8.config import ScalingGranularity

    cfg = module.config
    return all(c.scaling_granularity is ScalingGranularity.TENSORWISE for c in (
        cfg.cast_config_input, cfg.cast_config_weight, cfg.cast_config_grad_output))


def make_style(style: str, module: nn.Module, sp: bool, float8_collectives: bool = True,
               loss_parallel: bool = False):
    """The DTensor ParallelStyle for one module. ``float8_collectives``: the backend can
    move float8 tensors (nccl; gloo cannot), so tensorwise Float8Linear modules get
    torchao's styles that all-gather in float8. ``loss_parallel``: this is the vocabulary
    head and its logits stay a vocab-sharded DTensor (``Shard(-1)``), not gathered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel)

    if float8_collectives and _is_float8_tensorwise(module):
        from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel,
                                                           Float8RowwiseParallel)
        Col, Row = Float8ColwiseParallel, Float8RowwiseParallel
    else:
        Col, Row = ColwiseParallel, RowwiseParallel
    stream = Shard(1) if sp else Replicate()  # layout of the residual stream
    if style == "colwise":
        return Col()
    if style == "rowwise":
        return Row(output_layouts=stream)
    if style == "colwise_rep" and loss_parallel:
        return Col(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    if style == "colwise_rep":
        return Col(input_layouts=stream, output_layouts=Replicate())
    if style == "rowwise_rep":
        return Row(input_layouts=Replicate(), output_layouts=stream)
    if style == "embedding_rowwise":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if style == "sequence_parallel":
        return SequenceParallel()
    if style == "sequence_parallel_local":
        return SequenceParallel(use_local_output=True)
    if style == "embedding_rowwise_rep":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    raise PlanError(f"unknown tp style {style!r}; choose one of: {', '.join(TP_STYLES)}")


def gather_sequence_style(owner: nn.Module, children: list[nn.Module],
                          float8_collectives: bool = True):
    """PrepareModuleInput for a module owning colwise layers under sequence parallel: its
    first positional input arrives sequence-sharded and is all-gathered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    params = [p for p in inspect.signature(owner.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    rest = (None,) * max(len(params) - 1, 0)
    cls = PrepareModuleInput
    if float8_collectives and children and all(_is_float8_tensorwise(c) for c in children):
        from torchao.float8.float8_tensor_parallel import PrepareFloat8ModuleInput
        cls = PrepareFloat8ModuleInput
    return cls(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
               use_local_output=True)


class SequenceHook:
    """A module's hidden-states input (first positional, or ``hidden_states=``) split on the
    sequence (``split``: a block entered with the whole stream) or all-gathered from it
    (an attention/MLP module under sequence parallel)."""

    def __init__(self, split: bool):
        self.split = split

    def apply(self, module: nn.Module, mesh) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        src, dst = ((Replicate(), Shard(1)) if self.split else (Shard(1), Replicate()))

        def relayout(x):
            if isinstance(x, DTensor):
                x = x.to_local()
            return DTensor.from_local(x, mesh, [src], run_check=False).redistribute(
                mesh, [dst]).to_local()

        def hook(mod, args, kwargs):
            if args:
                return (relayout(args[0]), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": relayout(kwargs["hidden_states"])}
            raise RuntimeError(f"{type(mod).__name__}: no hidden states input to relayout")

        module.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class TensorParallelDecision(Decision):
    """``styles``: {module: style} resolved from the plan's tp_plan (the ``modules``);
    ``sharded``: those whose weights are split; ``gather_owners``: modules whose first
    input is all-gathered (sequence parallel); ``divide``: {owner: [attr]} integer
    attributes divided by tp; ``float8_collectives``: float8 TP styles may be used (the
    backend can move float8 tensors)."""

    tp: int
    sequence_parallel: bool
    styles: dict[str, str]
    sharded: list[str]
    gather_owners: list[str]
    divide: dict[str, list[str]]
    float8_collectives: bool
    loss_head: str | None = None  # parallel.loss_parallel: the head left vocab-sharded


def vocab_head(graph: ModuleGraph, styles: dict[str, str]) -> str | None:
    """The gathered (colwise_rep) Linear whose output size is the vocabulary: the
    model's ``config.vocab_size`` or its token embedding's row count."""
    vocab = {getattr(getattr(graph.model, "config", None), "vocab_size", None)}
    vocab |= {graph.module(n).num_embeddings for n in graph.names()
              if n and isinstance(graph.module(n), nn.Embedding)}
    heads = [n for n, s in styles.items() if s == "colwise_rep"
             and isinstance(graph.module(n), nn.Linear)
             and graph.module(n).out_features in vocab]
    return heads[0] if len(heads) == 1 else None


def decide(graph: ModuleGraph, plan: Plan, env: Any) -> TensorParallelDecision:
    tp, sp = plan.parallel.tp, plan.parallel.sequence_parallel
    styles, notes = resolve_tp_plan(graph, plan)
    sharded = [n for n, s in styles.items() if s in SHARDING_STYLES]
    counts: dict[str, int] = {}
    for s in styles.values():
        counts[s] = counts.get(s, 0) + 1
    notes = list(notes) + [f"tp={tp}: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    f8c = collective_backend(env) != "gloo"  # gloo has no float8 collectives
    if plan.fp8 is not None and plan.fp8.recipe == "tensorwise":
        notes.append("fp8 tensorwise: " + (
            "torchao's float8 TP styles (float8 all-gathers)" if f8c else
            "the plain TP styles: the gloo backend cannot all-gather float8 tensors"))
    divide = {o: [a for a in plan.tp_divide_attrs
                  if isinstance(getattr(graph.module(o), a, None), int)]
              for o in _owners_of_sharded(styles)}
    for owner in _fused_split_owners(graph, styles):
        if "split_size" not in divide.setdefault(owner, []):
            divide[owner].append("split_size")
    head = vocab_head(graph, styles) if plan.parallel.loss_parallel else None
    if head is not None:
        notes.append(f"loss parallel: {head}'s logits stay vocab-sharded (Shard(-1)); the "
                     "cross-entropy runs on the shards under torch's loss_parallel()")
    return TensorParallelDecision(
        modules=list(styles), notes=notes, tp=tp, sequence_parallel=sp, styles=dict(styles),
        loss_head=head,
        sharded=sharded, gather_owners=_sp_owners(graph, styles) if sp else [],
        divide={o: a for o, a in divide.items() if a}, float8_collectives=f8c,
        details={"styles": dict(styles), "sharded_modules": sharded, "tp": tp,
                 "loss_parallel": head is not None, "loss_head": head},
        memory=MemoryEffect(parameters=tp, gradients=tp, optimizer=tp,
                            modules=tuple(sharded), activation_split=tp))


@register_pass("tensor_parallel", config=TensorParallelConfig, after=("fp8",),
               before=("context_parallel",))
class TensorParallel(Pass):
    replaces_parameters = True

    def check(self, ctx: PassContext) -> TensorParallelDecision:
        graph, plan = ctx.graph, ctx.plan
        tp = plan.parallel.tp
        _check_fp8_backend(plan)
        decision = decide(graph, plan, ctx.env)
        if not decision.sharded:
            raise PlanError(
                f"parallel.tp={tp} but the tp plan shards no module of "
                f"{type(graph.model).__name__} (plan {plan.tp_plan!r}){_unshardable(graph)}; "
                f"give tp_plan as a dict {{glob: style}}, e.g. "
                f"{{{_example(graph)!r}: 'colwise'}}, or use fsdp / ddp without tp"
            )
        _check_modules(graph, decision.styles)
        _check_heads(graph, tp)
        _check_local_sizes(graph, decision.styles, tp)
        _check_divide_attrs(graph, decision.styles, plan)
        if plan.parallel.sequence_parallel:
            _check_sequence_parallel(graph, decision.styles)
        if plan.parallel.loss_parallel and decision.loss_head is None:
            heads = sorted(n for n, s in decision.styles.items() if s == "colwise_rep")
            raise PlanError(
                "parallel.loss_parallel=True but the tp plan has no single vocabulary-sized "
                f"head gathered with colwise_rep (found {heads or 'none'}; a head tied to "
                "the embedding is not sharded); give the lm_head the style 'colwise_rep' "
                "in tp_plan, untie it, or use loss_parallel=False")
        return decision

    def apply(self, model: nn.Module, decision: TensorParallelDecision,
              ctx: PassContext) -> Applied:
        from torch.distributed.tensor.parallel import parallelize_module

        graph = ctx.graph
        # under pp the graph is one stage: the modules of the other stages are elsewhere
        styles = {n: s for n, s in decision.styles.items() if n in graph and not getattr(
            graph.module(n), "stage_placeholder", False)}
        sp, f8c = decision.sequence_parallel, decision.float8_collectives
        _verify_after_earlier_passes(graph, styles)
        mesh = ctx.env.mesh["tp"]
        fp8 = sorted(n for n in styles if _is_float8_tensorwise(graph.module(n)))
        for name, style in styles.items():
            module = graph.module(name)
            if style == "sequence_split":
                SequenceHook(split=True).apply(module, mesh)
                continue
            parallelize_module(module, mesh, make_local_style(name, module, style)
                               if style in LOCAL_STYLES else make_style(
                                   style, module, sp, f8c, name == decision.loss_head))
        for owner in decision.gather_owners:
            if "sequence_split" in styles.values():  # the model's own plan: any call form
                SequenceHook(split=False).apply(graph.module(owner), mesh)
                continue
            kids = [graph.module(n) for n, s in styles.items()
                    if s == "colwise" and n.rpartition(".")[0] == owner]
            parallelize_module(graph.module(owner), mesh,
                               gather_sequence_style(graph.module(owner), kids, f8c))
        for owner, attrs in decision.divide.items():
            if owner not in graph:
                continue  # under pp: a module of another stage
            for attr in attrs:
                setattr(graph.module(owner), attr, getattr(graph.module(owner), attr)
                        // decision.tp)
        rec = self.preview(decision, ctx)
        if fp8 and f8c:
            rec.note(f"{len(fp8)} Float8Linear modules use torchao's float8 TP styles")
        elif fp8:
            rec.note(f"{len(fp8)} Float8Linear modules use the plain TP styles: the "
                     f"{ctx.env.backend} backend cannot all-gather float8 tensors")
        rec.details["float8_modules"] = fp8
        return Applied(rec)
