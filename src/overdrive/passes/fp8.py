"""fp8: swap ``nn.Linear`` layers for FP8 training layers.

Two backends, one selection rule:

- ``torchao``: ``convert_to_float8_training`` with a ``Float8LinearConfig`` recipe
  (tensorwise / rowwise dynamic scaling). Runs on CPU too; on CUDA it needs compute
  capability >= 8.9 for the fp8 matmuls.
- ``te``: NVIDIA Transformer Engine. Each eligible ``nn.Linear`` (and, with
  ``layernorm=True``, each LayerNorm / RMSNorm) becomes the ``transformer_engine.pytorch``
  module with the same weights; the forward runs under ``te.fp8_autocast`` with the recipe,
  handed on as a forward context (``Applied.forward_contexts``) for the runtime to enter.
  Needs CUDA.
- ``auto``: ``te`` when CUDA and Transformer Engine are present (and the recipe is one TE
  has), else ``torchao``.

Which layers: a Linear is converted unless its in/out features are not multiples of 16
(fp8 matmuls need that), or it is left out by the user's filter (a regex searched in the
qualified name, or ``fn(name) -> bool``). Without a filter the output projection
(``lm_head``) is kept in high precision; with one, the filter decides for it like for any
other Linear, and converting it is always noted in the record (an exclusion filter such as
``lambda n: "attn" not in n`` selects it too). Every skip is recorded with its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..quiet import quiet_import
from ..plan_spec import FP8, Plan
from ..rewrite.contract import Applied, Decision, Pass, PassContext
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import register_pass
from .fp8_conv1d import conv1d_features, convert_conv1d, is_hf_conv1d

TORCHAO_EXTRA = "pip install overdrive[fp8]"
TE_EXTRA = "pip install overdrive[te]"
TORCHAO_RECIPES = ("tensorwise", "rowwise")
# transformer_engine.common.recipe classes; Float8CurrentScaling needs TE >= 2.2
TE_RECIPES = {"tensorwise": "Float8CurrentScaling", "mxfp8": "MXFP8BlockScaling"}
TE_UPGRADE = "pip install -U 'transformer-engine[pytorch]>=2.2'"
OUTPUT_NAMES = ("lm_head", "output")
MULTIPLE = 16


# --------------------------------------------------------------------------- availability


def torchao_importable() -> bool:
    try:
        quiet_import("torchao.float8")  # its CUDA-only kernels' load failures are harmless
    except Exception:  # noqa: BLE001 - a broken install is as unavailable as a missing one
        return False
    return True


def te_importable() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - TE raises OSError/RuntimeError without CUDA libs
        return False
    return True


def te_has_recipe(recipe: str) -> bool:
    """Does the installed Transformer Engine have the scaling recipe ``recipe`` needs?"""
    try:
        recipes = importlib.import_module("transformer_engine.common.recipe")
    except Exception:  # noqa: BLE001 - as in te_importable
        return False
    return hasattr(recipes, TE_RECIPES.get(recipe, ""))


def te_version() -> str:
    for dist in ("transformer-engine", "transformer_engine"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def choose_backend(cfg: FP8, device_type: str, te_ok: bool) -> str:
    """The backend ``cfg.backend`` resolves to on a ``device_type`` device; ``te_ok``: a
    Transformer Engine with the recipe is importable."""
    if cfg.backend != "auto":
        return cfg.backend
    if device_type == "cuda" and te_ok and cfg.recipe in TE_RECIPES:
        return "te"
    if cfg.recipe not in TORCHAO_RECIPES:
        raise BackendUnavailable(
            f"fp8.recipe={cfg.recipe!r} needs Transformer Engine >= 2.2 on a CUDA device "
            f"(device here: {device_type}; a Transformer Engine with this recipe importable: "
            f"{te_ok}); {TE_EXTRA}, or use recipe 'tensorwise' / 'rowwise' with torchao")
    return "torchao"


def _check_backend(backend: str, cfg: FP8, device: torch.device) -> None:
    """Raise ``BackendUnavailable`` / ``PlanError`` when ``backend`` cannot run here."""
    if backend == "torchao":
        if not torchao_importable():
            raise BackendUnavailable(
                f"fp8.backend='torchao' needs torchao (torchao.float8 could not be "
                f"imported); {TORCHAO_EXTRA}")
        if cfg.recipe not in TORCHAO_RECIPES:
            raise PlanError(f"fp8.recipe={cfg.recipe!r} is not a torchao training recipe; "
                            f"choose one of {TORCHAO_RECIPES} or backend='te'")
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            cap = torch.cuda.get_device_capability(device)
            raise BackendUnavailable(
                f"fp8 (torchao) needs fp8 matmuls: CUDA compute capability >= 8.9 "
                f"(Ada, Hopper, Blackwell); this GPU is {cap[0]}.{cap[1]}. "
                "Use mixed_precision='bf16' instead")
        return
    if cfg.recipe not in TE_RECIPES:
        raise PlanError(f"fp8.recipe={cfg.recipe!r} is not available with backend='te'; "
                        f"choose one of {tuple(TE_RECIPES)}, or backend='torchao' for 'rowwise'")
    if device.type != "cuda":
        raise BackendUnavailable(
            f"fp8.backend='te' needs a CUDA device with Transformer Engine ({TE_EXTRA}); "
            f"this run's device is {device.type}. Use backend='torchao' ({TORCHAO_EXTRA}), "
            "which also runs on CPU")
    if not te_importable():
        raise BackendUnavailable(
            f"fp8.backend='te' needs Transformer Engine (transformer_engine.pytorch could "
            f"not be imported); {TE_EXTRA}")
    need = (10, 0) if cfg.recipe == "mxfp8" else (8, 9)
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        raise BackendUnavailable(
            f"fp8.recipe={cfg.recipe!r} with Transformer Engine needs CUDA compute capability "
            f">= {need[0]}.{need[1]}; this GPU is {cap[0]}.{cap[1]}")
    if not te_has_recipe(cfg.recipe):
        raise BackendUnavailable(
            f"fp8.recipe={cfg.recipe!r} with Transformer Engine needs "
            f"transformer_engine.common.recipe.{TE_RECIPES[cfg.recipe]}, which Transformer "
            f"Engine {te_version()} lacks (it needs >= 2.2); {TE_UPGRADE}")


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which modules the pass converts, which it skips and why."""

    convert: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)  # te + layernorm=True only
    output: str | None = None


def _plain_linear(module: nn.Module) -> bool:
    """A Linear whose forward is nn.Linear's own (a subclass with its own forward, or an
    already converted fp8 layer, would lose behaviour in a swap)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def output_projection(graph: ModuleGraph) -> str | None:
    """The output projection: the last Linear named lm_head/output outside the repeated
    blocks (a block may have its own ``output`` Linear), else the last Linear."""
    linears = [n for n in graph.modules_of_type(nn.Linear) if n]
    inside = {n for b in graph.blocks() for n in graph.subtree(b)}
    named = [n for n in linears if n.rpartition(".")[2] in OUTPUT_NAMES and n not in inside]
    if named:
        return named[-1]
    return linears[-1] if linears else None


def _filter_says(flt: Any, name: str) -> bool:
    if isinstance(flt, str):
        return re.search(flt, name) is not None
    return bool(flt(name))


def _skip_reason(name: str, module: nn.Linear, cfg: FP8, output: str | None) -> str | None:
    if not _plain_linear(module):
        return f"{type(module).__name__} has its own forward; only plain nn.Linear is swapped"
    i, o = module.in_features, module.out_features
    if i % MULTIPLE or o % MULTIPLE:
        return (f"in_features={i}, out_features={o}: fp8 matmuls need multiples of "
                f"{MULTIPLE}")
    if cfg.filter is None:
        if name == output:
            return ("output projection kept in high precision (select it with fp8.filter "
                    "to convert it)")
        return None
    if _filter_says(cfg.filter, name):
        return None
    if isinstance(cfg.filter, str):
        return f"fp8.filter {cfg.filter!r} does not match the name"
    return "fp8.filter returned False"


def _conv1d_skip_reason(name: str, module: nn.Module, cfg: FP8, backend: str) -> str | None:
    """transformers' Conv1D (GPT-2): torchao runs it in fp8; te swaps nn.Linear only."""
    if backend != "torchao":
        return "transformers' Conv1D: only the torchao backend converts it"
    i, o = conv1d_features(module)
    if i % MULTIPLE or o % MULTIPLE:
        return (f"in_features={i}, out_features={o}: fp8 matmuls need multiples of "
                f"{MULTIPLE}")
    if cfg.filter is None or _filter_says(cfg.filter, name):
        return None
    if isinstance(cfg.filter, str):
        return f"fp8.filter {cfg.filter!r} does not match the name"
    return "fp8.filter returned False"


def _candidates(graph: ModuleGraph) -> list[str]:
    """nn.Linear layers and transformers' Conv1D layers, in model order."""
    return [n for n in graph.names()
            if isinstance(graph.module(n), nn.Linear) or is_hf_conv1d(graph.module(n))]


def select(graph: ModuleGraph, cfg: FP8, backend: str) -> Selection:
    """Decide, without touching anything, which modules the pass converts."""
    sel = Selection(output=output_projection(graph))
    for name in _candidates(graph):
        if not name:
            sel.skipped["<root>"] = "the root module itself cannot be swapped in place"
            continue
        module = graph.module(name)
        if is_hf_conv1d(module):
            reason = _conv1d_skip_reason(name, module, cfg, backend)
        else:
            reason = _skip_reason(name, module, cfg, sel.output)
        if reason is None:
            sel.convert.append(name)
        else:
            sel.skipped[name] = reason
    if backend == "te" and cfg.layernorm:
        sel.norms = [n for n in graph.modules_of_type(nn.LayerNorm, nn.RMSNorm) if n
                     and getattr(graph.module(n), "elementwise_affine", False)]
    return sel


# --------------------------------------------------------------------------- torchao


def _fsdp_float8_asked(plan: Plan) -> bool:
    cfg = plan.fp8
    return (plan.fsdp is not None and cfg.recipe == "tensorwise"
            and cfg.fsdp_float8_all_gather)


def float8_collectives(env: Any) -> bool:
    """Can the process group move float8 tensors? gloo cannot ("Invalid scalar type"): an
    FSDP unit whose weights are all float8 would all-gather them in float8 and fail."""
    if env.dry_run:  # od.inspect answers for this machine (nccl when it has CUDA)
        return torch.cuda.is_available()
    return env.backend != "gloo"


def _fsdp_float8_all_gather(plan: Plan, env: Any) -> bool:
    return _fsdp_float8_asked(plan) and float8_collectives(env)


def torchao_config(plan: Plan, env: Any):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(plan.fp8.recipe)
    if _fsdp_float8_all_gather(plan, env):
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def apply_torchao(model: nn.Module, sel: Selection, plan: Plan, env: Any) -> tuple[dict, list]:
    """Convert; returns (record details, post-step hooks)."""
    from torchao.float8 import convert_to_float8_training

    chosen = set(sel.convert)
    config = torchao_config(plan, env)
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda _m, fqn: fqn in chosen)
    conv1d = [n for n in sel.convert if is_hf_conv1d(model.get_submodule(n))]
    for name in conv1d:
        convert_conv1d(model.get_submodule(name), config)
    details: dict[str, Any] = {"fsdp_float8_all_gather": config.enable_fsdp_float8_all_gather}
    hooks = [precompute_fsdp_scales] if config.enable_fsdp_float8_all_gather else []
    return details, hooks


def precompute_fsdp_scales(model: nn.Module, optimizer: Any = None) -> None:
    """Post-optimizer-step hook: one all-reduce computes every fp8 weight's scale for the
    next FSDP float8 all-gather (torchao's ``precompute_float8_dynamic_scale_for_fsdp``)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


# --------------------------------------------------------------------------- transformer engine


def te_recipe(recipe: str):
    """Current (per-tensor) or MXFP8 block scaling: neither keeps an amax history, which
    is why the swapped modules can drop TE's ``_extra_state`` (DelayedScaling needs it)."""
    from transformer_engine.common import recipe as te_recipes

    return getattr(te_recipes, TE_RECIPES[recipe])()


@functools.lru_cache(maxsize=None)
def _without_extra_state(cls: type) -> type:
    """A subclass that saves no ``_extra_state`` entry, so state_dict keys stay the
    model's own (the tensorwise/mxfp8 recipes keep no scaling history to save)."""
    return type(cls.__name__, (cls,), {"get_extra_state": nn.Module.get_extra_state,
                                       "set_extra_state": nn.Module.set_extra_state,
                                       "__module__": __name__})


def _te_module(te, module: nn.Module, size: int | None = None,
               device: torch.device | None = None) -> nn.Module:
    """The Transformer Engine module that replaces ``module`` (same dims, dtype, device),
    or a ``size``-wide probe of it on ``device``."""
    w = module.weight
    kw = {"params_dtype": w.dtype, "device": w.device if device is None else device}
    if isinstance(module, nn.Linear):
        i, o = (size, size) if size else (module.in_features, module.out_features)
        return _without_extra_state(te.Linear)(i, o, bias=module.bias is not None, **kw)
    hidden = size or module.normalized_shape[-1]
    if isinstance(module, nn.LayerNorm):
        return _without_extra_state(te.LayerNorm)(hidden, eps=module.eps, **kw)
    eps = module.eps if module.eps is not None else torch.finfo(w.dtype).eps  # nn.RMSNorm
    return _without_extra_state(te.RMSNorm)(hidden, eps=eps, **kw)


def _keys(module: nn.Module) -> tuple[list[str], list[str]]:
    """(parameter names, state_dict keys) of ``module``."""
    return sorted(n for n, _ in module.named_parameters()), sorted(module.state_dict())


def check_te_keys(graph: ModuleGraph, sel: Selection) -> None:
    """Refuse a swap that would change state_dict keys, before anything is touched: one
    small meta-device probe (TE supports deferred init) of each kind of module (class and
    parameter names) is built and its keys compared."""
    te = importlib.import_module("transformer_engine.pytorch")
    probed: set[tuple] = set()
    for name in sel.convert + sel.norms:
        module = graph.module(name)
        kind = (type(module), *map(tuple, _keys(module)))
        if kind in probed:
            continue
        probed.add(kind)
        probe = _te_module(te, module, size=MULTIPLE, device=torch.device("meta"))
        if _keys(probe) != _keys(module):
            raise PlanError(
                f"fp8: Transformer Engine's {type(probe).__name__} has parameters "
                f"{_keys(probe)[0]} where {name} ({type(module).__name__}) has "
                f"{_keys(module)[0]}; swapping would change the state_dict keys. Use "
                "backend='torchao'" + (", or layernorm=False" if name in sel.norms else ""))


@torch.no_grad()
def _copy_params(old: nn.Module, new: nn.Module) -> None:
    theirs = dict(new.named_parameters())
    for name, p in old.named_parameters():  # same names: check_te_keys made sure
        theirs[name].copy_(p)
        theirs[name].requires_grad_(p.requires_grad)


def _te_replacement(te, module: nn.Module) -> nn.Module:
    new = _te_module(te, module)
    _copy_params(module, new)
    return new


def apply_te(model: nn.Module, sel: Selection, plan: Plan) -> tuple[dict, list]:
    """Swap; returns (record details, forward contexts: TE's fp8_autocast)."""
    te = importlib.import_module("transformer_engine.pytorch")
    names = sel.convert + sel.norms
    # build every replacement first: a failure leaves the model as it was
    replacements = {n: _te_replacement(te, model.get_submodule(n)) for n in names}
    for name, new in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    recipe = te_recipe(plan.fp8.recipe)
    autocast = getattr(te, "fp8_autocast")
    context = lambda: autocast(enabled=True, fp8_recipe=recipe)  # noqa: E731
    return {"te_recipe": type(recipe).__name__, "norms": list(sel.norms)}, [context]


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class FP8Decision(Decision):
    """``selection``: the Linear layers converted (and TE norms), those skipped and why;
    ``backend``: torchao or te, as resolved for this device."""

    backend: str
    recipe: str
    selection: Selection


def backend_for(cfg: FP8, env: Any) -> str:
    device_type = env.device.type
    if env.dry_run:  # the real device is unknown: resolve as this machine would
        if cfg.backend == "auto" and cfg.recipe not in TORCHAO_RECIPES:
            return "te"
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return choose_backend(cfg, device_type, te_importable() and te_has_recipe(cfg.recipe))


def decide(graph: ModuleGraph, cfg: FP8, backend: str) -> FP8Decision:
    sel = select(graph, cfg, backend)
    notes = [f"backend {backend}, recipe {cfg.recipe}: {len(sel.convert)} Linear layer(s) "
             "converted"]
    notes += [f"{name} skipped: {reason}" for name, reason in sel.skipped.items()]
    head_converted = sel.output in sel.convert
    if head_converted:
        notes.append(f"{sel.output} converted: fp8.filter selected the output projection, "
                     "which is kept in high precision when no filter is given (fp8 logits "
                     "can cost accuracy); make the filter return False for it to keep it")
    return FP8Decision(
        modules=sel.convert + sel.norms, notes=notes, backend=backend, recipe=cfg.recipe,
        selection=sel,
        details=dict(backend=backend, recipe=cfg.recipe, converted=list(sel.convert),
                     skipped=dict(sel.skipped), output_projection=sel.output,
                     output_projection_converted=head_converted))


@register_pass("fp8", config=FP8, after=("casting",), before=("tensor_parallel",))
class FP8Training(Pass):
    """Swap eligible Linears for FP8 training layers (torchao or Transformer Engine)."""

    replaces_parameters = True  # te builds new modules; torchao + FSDP all-gather re-wraps

    def check(self, ctx: PassContext) -> FP8Decision:
        cfg, env = ctx.cfg, ctx.env
        backend = backend_for(cfg, env)
        if not env.dry_run:  # od.inspect plans for another machine: notes, not errors
            _check_backend(backend, cfg, env.device)
        decision = decide(ctx.graph, cfg, backend)
        sel = decision.selection
        if not sel.convert:
            shown = "; ".join(f"{n}: {r}" for n, r in list(sel.skipped.items())[:6])
            raise PlanError(
                "fp8: no nn.Linear (or transformers Conv1D) is eligible for conversion"
                + (f" ({shown})" if shown else " (the model has no nn.Linear)")
                + "; check fp8.filter, or use mixed_precision='bf16' for this model")
        if backend == "te" and not env.dry_run:
            check_te_keys(ctx.graph, sel)
        if env.dry_run:
            decision.notes += _availability_notes(backend, cfg)
        decision.notes += _collective_notes(decision, ctx) + _emulation_notes(decision, env)
        return decision

    def apply(self, model: nn.Module, decision: FP8Decision, ctx: PassContext) -> Applied:
        rec = self.preview(decision, ctx)
        if decision.backend == "torchao":
            details, hooks = apply_torchao(model, decision.selection, ctx.plan, ctx.env)
            rec.details.update(details)
            return Applied(rec, post_step_hooks=hooks)
        details, contexts = apply_te(model, decision.selection, ctx.plan)
        rec.details.update(details)
        return Applied(rec, forward_contexts=contexts)


def _collective_notes(decision: FP8Decision, ctx: PassContext) -> list[str]:
    if decision.backend == "torchao" and _fsdp_float8_asked(ctx.plan) \
            and not float8_collectives(ctx.env):
        decision.details["fsdp_float8_all_gather"] = False
        return ["fsdp all-gathers the fp8 layers' weights in high precision: the gloo "
                "backend cannot all-gather float8 tensors (fp8.fsdp_float8_all_gather "
                "applies on nccl)"]
    return []


def _emulation_notes(decision: FP8Decision, env: Any) -> list[str]:
    """torchao has no fp8 matmul kernel on CPU: it emulates them (correct, not fast)."""
    device_type = env.device.type
    if env.dry_run:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    emulated = decision.backend == "torchao" and device_type != "cuda"
    decision.details["emulated"] = emulated
    if not emulated:
        return []
    return [f"fp8 on {device_type} is emulated (torchao upcasts every fp8 matmul): "
            "it trains with fp8 numerics but is no speedup — slower than bf16 "
            "wherever the CPU computes bf16 natively (3x in benchmarks/fp8.py's "
            "latest run); the speedup needs a CUDA GPU with fp8 tensor cores "
            "(compute capability >= 8.9)"]


def _availability_notes(backend: str, cfg: FP8) -> list[str]:
    """What a dry run says about running ``backend`` (od.inspect plans for another
    machine: these are notes, not errors)."""
    if backend == "te":
        notes = ["te: the real run needs a CUDA device (compute capability >= 8.9, "
                 ">= 10.0 for mxfp8)"]
        if not te_importable():
            notes.append(f"te: Transformer Engine is not importable on this machine; {TE_EXTRA}")
        elif not te_has_recipe(cfg.recipe):
            notes.append(f"te: Transformer Engine {te_version()} here lacks "
                         f"{TE_RECIPES[cfg.recipe]} (needs >= 2.2); {TE_UPGRADE}")
        return notes
    if not torchao_importable():
        return [f"torchao is not importable on this machine; {TORCHAO_EXTRA}"]
    return []
