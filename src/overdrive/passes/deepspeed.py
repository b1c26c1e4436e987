"""deepspeed: DeepSpeed ZeRO (stages 0–3) as the data-parallel engine.

The DeepSpeed config is the user's (a dict or a JSON path, optional) with the fields the
plan owns filled in from the plan — ZeRO stage, gradient accumulation steps, fp16/bf16,
optimizer offload, gradient clipping — so the two can never disagree: a user config that
says otherwise is refused in ``check`` with both values named.

The engine owns backward and step: handed on as ``Applied.engine``, it is what
``rt.backward`` calls, and
``engine.step()`` must run on *every* micro-step (it counts the accumulation boundaries
itself and only updates the weights on the last one). The optimizer is the user's
(a torch optimizer from ``env.optimizer_factory``, which on CPU is what works: DeepSpeed's
fused Adam needs compiled ops), or the one the config's ``"optimizer"`` section names.
The model object stays the root: ZeRO-3 partitions its parameters in place and installs
its gather hooks on the module itself.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..plan_spec import DeepSpeed, Plan
from ..rewrite.contract import Applied, Decision, MemoryEffect, Pass, PassContext
from ..rewrite.manager import register_pass

INSTALL_HINT = "pip install overdrive[deepspeed]"


def user_config(plan: Plan) -> dict[str, Any]:
    cfg = plan.deepspeed.config
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return copy.deepcopy(dict(cfg))
    with open(os.fspath(cfg), encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise PlanError(f"deepspeed.config={str(cfg)!r} is not valid JSON: {err}") from None


def _precision_section(cfg: Mapping[str, Any], key: str) -> tuple[str, Any]:
    """(the key DeepSpeed reads, its section): bf16 falls back to the old "bfloat16"."""
    if key == "bf16" and "bf16" not in cfg and "bfloat16" in cfg:
        return "bfloat16", cfg["bfloat16"]
    return key, cfg.get(key)


def _offload_device(zero: Mapping[str, Any]) -> str:
    off = zero.get("offload_optimizer") or {}
    return str(off.get("device", "none")) if isinstance(off, Mapping) else "none"


def contradictions(cfg: Mapping[str, Any], plan: Plan, dp_size: int) -> list[str]:
    """Every field where the user's DeepSpeed config says something the plan does not."""
    ds = plan.deepspeed
    found = []
    zero = cfg.get("zero_optimization") or {}
    if "stage" in zero and zero["stage"] != ds.zero_stage:
        found.append(f"zero_optimization.stage={zero['stage']} but deepspeed.zero_stage="
                     f"{ds.zero_stage}; set od.DeepSpeed(zero_stage={zero['stage']})")
    gas = cfg.get("gradient_accumulation_steps")
    if gas is not None and gas != plan.grad_accum:
        found.append(f"gradient_accumulation_steps={gas} but plan.grad_accum="
                     f"{plan.grad_accum}; set grad_accum={gas} in the plan")
    found += _batch_size_contradictions(cfg, plan.grad_accum, dp_size)
    for key, wanted in (("fp16", "fp16"), ("bf16", "bf16")):
        name, section = _precision_section(cfg, key)
        if not isinstance(section, Mapping) or "enabled" not in section:
            continue  # no opinion: filled from the plan
        on, planned = bool(section["enabled"]), plan.mixed_precision == wanted
        if on and not planned:
            found.append(f"{name}.enabled=true but plan.mixed_precision="
                         f"{plan.mixed_precision!r}; set mixed_precision={wanted!r}")
        elif planned and not on:
            found.append(f"{name}.enabled=false but plan.mixed_precision={wanted!r}; set "
                         f"{name}.enabled=true (or drop it), or choose another mixed_precision")
    device = _offload_device(zero)
    if "offload_optimizer" in zero and (device not in ("none", "None")) != ds.offload_optimizer:
        found.append(f"zero_optimization.offload_optimizer.device={device!r} but "
                     f"deepspeed.offload_optimizer={ds.offload_optimizer}")
    clip = cfg.get("gradient_clipping")
    if clip is not None and ds.gradient_clipping is not None and clip != ds.gradient_clipping:
        found.append(f"gradient_clipping={clip} but deepspeed.gradient_clipping="
                     f"{ds.gradient_clipping}")
    return found


def _batch_size_contradictions(cfg: Mapping[str, Any], grad_accum: int, dp_size: int) -> list[str]:
    """DeepSpeed's train_batch_size = micro batch × gradient accumulation × data ranks,
    checked against the plan's grad_accum whatever the config says about accumulation."""
    tbs, micro = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    if tbs is None:
        return []
    if micro is not None and tbs != micro * grad_accum * dp_size:
        return [f"train_batch_size={tbs} is not train_micro_batch_size_per_gpu={micro} "
                f"× grad_accum={grad_accum} × data ranks={dp_size} = "
                f"{micro * grad_accum * dp_size}"]
    if micro is None and tbs % (grad_accum * dp_size):
        return [f"train_batch_size={tbs} is not divisible by grad_accum={grad_accum} × data "
                f"ranks={dp_size}; give a multiple of {grad_accum * dp_size}"]
    return []


def build_config(plan: Plan, dp_size: int, client_optimizer: bool) -> dict[str, Any]:
    """The user's config with every plan-owned field filled from the plan."""
    ds = plan.deepspeed
    cfg = user_config(plan)
    zero = dict(cfg.get("zero_optimization") or {})
    zero["stage"] = ds.zero_stage
    if ds.offload_optimizer:  # the user's device ("nvme" with its path) is kept
        device = _offload_device(zero)
        zero["offload_optimizer"] = {**(zero.get("offload_optimizer") or {}),
                                     "device": device if device in ("cpu", "nvme") else "cpu"}
    cfg["zero_optimization"] = zero
    cfg["gradient_accumulation_steps"] = plan.grad_accum
    if "train_micro_batch_size_per_gpu" not in cfg and "train_batch_size" not in cfg:
        cfg["train_micro_batch_size_per_gpu"] = 1  # only DeepSpeed's own logging reads it
    clip = ds.gradient_clipping if ds.gradient_clipping is not None else cfg.get(
        "gradient_clipping", 0.0)
    cfg["gradient_clipping"] = clip
    cfg["fp16"] = {**(cfg.get("fp16") or {}), "enabled": plan.mixed_precision == "fp16"}
    _, bf16 = _precision_section(cfg, "bf16")  # one section, under the current name
    cfg.pop("bfloat16", None)
    cfg["bf16"] = {**(bf16 or {}), "enabled": plan.mixed_precision == "bf16"}
    if client_optimizer:  # a torch optimizer: allowed under ZeRO, offloaded if asked
        cfg["zero_allow_untested_optimizer"] = True
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


@dataclass(kw_only=True)
class DeepSpeedDecision(Decision):
    """ZeRO ``zero_stage`` over ``dp_size`` ranks; ``client_optimizer``: the user's torch
    optimizer (else the config's ``"optimizer"`` section)."""

    zero_stage: int
    dp_size: int
    client_optimizer: bool


def _memory(plan: Plan, dp: int) -> MemoryEffect:
    stage = plan.deepspeed.zero_stage
    notes = ("DeepSpeed also keeps an fp32 master copy of the parameters (sharded with the "
             "optimizer state)",) if plan.mixed_precision != "no" else ()
    return MemoryEffect(parameters=dp if stage >= 3 else 1, gradients=dp if stage >= 2 else 1,
                        optimizer=dp if stage >= 1 else 1, notes=notes)


# After compile (blocks are compiled before the engine wraps the model).
@register_pass("deepspeed", config=DeepSpeed, after=("compile", "mixed_precision"))
class DeepSpeedPass(Pass):
    replaces_parameters = True

    def check(self, ctx: PassContext) -> DeepSpeedDecision:
        graph, plan, env = ctx.graph, ctx.plan, ctx.env
        if importlib.util.find_spec("deepspeed") is None:
            raise BackendUnavailable(
                f"deepspeed is not installed; {INSTALL_HINT} (or choose fsdp / ddp)")
        if not env.dry_run and any(t.is_meta for t in (*graph.model.parameters(),
                                                       *graph.model.buffers())):
            raise PlanError(
                "deepspeed: the model is on the meta device; build it on a real device "
                "(or use fsdp, which materialises a meta model shard by shard)")
        cfg = user_config(plan)
        found = contradictions(cfg, plan, env.dp_size)
        if found:
            raise PlanError("deepspeed config contradicts the plan: " + "; ".join(found))
        if plan.deepspeed.offload_optimizer and not env.dry_run and env.device.type == "cpu":
            raise PlanError(
                "deepspeed.offload_optimizer=True is not valid on a CPU device: the optimizer "
                "state already lives in host memory; set offload_optimizer=False")
        if not env.dry_run and env.optimizer_factory is None and "optimizer" not in cfg:
            raise PlanError(
                "deepspeed needs an optimizer: pass optimizer=lambda params: "
                "torch.optim.AdamW(params, lr=...) to accelerate(), or an \"optimizer\" "
                "section in deepspeed.config")
        if env.optimizer_factory is not None and "optimizer" in cfg:
            raise PlanError(
                "deepspeed: both accelerate(optimizer=...) and an \"optimizer\" section in "
                "deepspeed.config; keep one of them")
        stage = plan.deepspeed.zero_stage
        return DeepSpeedDecision(
            modules=[""], zero_stage=stage, dp_size=env.dp_size,
            client_optimizer=env.optimizer_factory is not None,
            details={"zero_stage": stage}, memory=_memory(plan, env.dp_size),
            notes=[f"ZeRO stage {stage} over {env.dp_size} data rank(s); engine.step() runs "
                   f"every micro-step and steps the weights every {plan.grad_accum}"])

    def apply(self, model: nn.Module, decision: DeepSpeedDecision, ctx: PassContext) -> Applied:
        import deepspeed

        env = ctx.env
        env.ensure_process_group()
        deepspeed.init_distributed(dist_backend=env.backend)
        optimizer = env.optimizer_factory(model) if decision.client_optimizer else None
        config = build_config(ctx.plan, decision.dp_size, client_optimizer=optimizer is not None)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            model_parameters=None if optimizer is not None else model.parameters())
        rec = self.preview(decision, ctx)
        rec.details["config"] = config
        return Applied(rec, engine=engine, optimizer=engine.optimizer)
