"""The plan: frozen dataclasses, presets, parsing from dict / YAML / JSON, validation.

A plan says *what* to do; the passes say *how*. ``resolve_plan`` turns whatever the user
handed in (a ``Plan``, a dict, a file path or a preset string such as ``"fsdp+compile+ac"``)
into one frozen, fully defaulted ``Plan`` and refuses anything malformed with a
``PlanError`` that names the field, the value and the valid choices.

Each pass is keyed by a config type: ``Plan.configs()`` is the one place that says which
configs a plan holds — its parts that are on, the configs derived from its sizes and
precision (``TensorParallelConfig``, ``ContextParallelConfig``, ``AutocastConfig``) and
the user's own in ``Plan.extra`` — and so which passes run. ``who_casts`` is the one rule
for who applies mixed precision.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from .errors import PlanError

# --------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Compile:
    """Regional (per block), full-model or no ``torch.compile``."""

    mode: str = "regional"  # "regional" | "full" | "off"
    backend: str | Callable[..., Any] = "inductor"  # a torch.compile backend name or callable
    compile_mode: str | None = None  # torch.compile's own `mode`
    fullgraph: bool = False
    dynamic: bool | None = None
    options: Mapping[str, Any] | None = None
    # warm starts: torch's compile cache artifacts, keyed by a fingerprint of the plan, the
    # model's structure, torch and the device kind, loaded before compiling and written
    # after the first optimizer step (passes/compile_cache.py)
    cache: bool = True
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/overdrive/compile (~/.cache/...)


@dataclass(frozen=True)
class FP8:
    """FP8 training layers: torchao everywhere, Transformer Engine on NVIDIA GPUs.

    ``filter`` picks the ``nn.Linear`` layers (and transformers ``Conv1D``, torchao only)
    to convert: a regex searched in the qualified
    name, or ``fn(name) -> bool``. Layers whose dims are not multiples of 16 are never
    converted. Without a filter the output projection (``lm_head``, else the last Linear)
    stays in high precision; a given filter decides for it too — returning True for it
    (as an exclusion filter like ``lambda n: "attn" not in n`` does) converts it, and the
    report notes that it did.
    """

    backend: str = "auto"  # "auto" | "torchao" | "te"
    recipe: str = "tensorwise"  # "tensorwise" | "rowwise" | "mxfp8"
    filter: str | Callable[[str], bool] | None = None  # regex or fn(qualified name) -> keep
    layernorm: bool = False  # te only: also swap LayerNorm
    fsdp_float8_all_gather: bool = True  # torchao tensorwise + fsdp: all-gather in fp8


@dataclass(frozen=True)
class Checkpointing:
    """Activation checkpointing of the repeated blocks."""

    mode: str = "full"  # "full" | "every" | "selective" | "budget"
    every: int = 2
    budget_bytes: int | None = None
    # mode="budget" traces activation memory on meta: the (batch, seq_len) of the token ids
    budget_input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Casting:
    """Layerwise casting for inference: store in `storage`, compute in `compute`."""

    storage: str = "float8_e4m3fn"
    compute: str = "bfloat16"
    skip: tuple[str, ...] = ("norm", "embed", "lm_head")
    # "auto": torch._scaled_mm on the float8 weight where the device has fp8 matmul units
    # (GPUs of compute capability >= 8.9), else the upcast copy; "copy" / "scaled_mm" force
    kernel: str = "auto"


@dataclass(frozen=True)
class Parallel:
    """Mesh sizes, outermost first: pp, dp_replicate, dp_shard, cp, tp. One of them may
    be -1: it takes the ranks the others leave."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False  # with tp: shard norms/activations along the sequence
    loss_parallel: bool = False  # with tp: logits stay vocab-sharded, cross-entropy on shards


@dataclass(frozen=True)
class FSDP:
    """FSDP2 ``fully_shard`` per block, then leftovers, then the root."""

    reshard_after_forward: bool = True
    offload: bool = False
    param_dtype: str | None = None  # None: from Plan.mixed_precision
    reduce_dtype: str | None = "float32"


@dataclass(frozen=True)
class DDP:
    """Plain data parallel: every rank keeps the whole model, gradients are all-reduced."""

    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False
    static_graph: bool = False
    # gradient all-reduce through torch's DDP communication hooks: "fp16" / "bf16" compress
    # the buckets, "powersgd" all-reduces a rank-`powersgd_rank` approximation (plain
    # all-reduce for the first `powersgd_start_iter` steps, as torch's PowerSGDState does)
    comm_hook: str | None = None
    powersgd_rank: int = 1
    powersgd_start_iter: int = 1000
    # torch DDP's default: rank 0's buffers (BatchNorm running stats) are broadcast
    # with each training forward, so every rank holds (and saves) the same ones
    broadcast_buffers: bool = True


@dataclass(frozen=True)
class DeepSpeed:
    """DeepSpeed ZeRO as the data-parallel engine."""

    zero_stage: int = 2
    config: Mapping[str, Any] | str | None = None  # dict or path to a DeepSpeed JSON
    offload_optimizer: bool = False
    gradient_clipping: float | None = None  # the engine clips (rt.clip_grad_norm_ cannot)


@dataclass(frozen=True)
class Offload:
    """Big-model inference: place the model across GPU, CPU and disk, bring offloaded
    weights to the execution device block by block (``prefetch`` blocks ahead, on a
    background thread).

    ``device_map``: ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"``
    (Accelerate's meanings) or ``{module FQN: "cuda:0" | "cpu" | "disk"}``. ``max_memory``:
    ``{device: bytes or "10GiB"}``; None: what each device has free, minus headroom.
    ``no_split``: class names never split across devices (None: the detected blocks').
    ``dtype``: floating weights converted to it as they are placed.
    """

    device_map: str | Mapping[str, str] = "auto"
    max_memory: Mapping[Any, int | str] | None = None
    offload_folder: str | os.PathLike | None = None
    no_split: tuple[str, ...] | None = None
    dtype: str | None = None
    prefetch: int = 1


@dataclass(frozen=True)
class Pipeline:
    """Pipeline parallelism over ``parallel.pp`` ranks with a torch.distributed.pipelining
    schedule. ``microbatches`` defaults to the number of stages (pp × stages_per_rank) and
    must divide the local batch; ``split`` is None (balanced by parameters and FLOPs) or
    the block indices where the stages begin."""

    schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved-1f1b" | "looped-bfs" | ...
    microbatches: int | None = None
    stages_per_rank: int = 1
    split: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TensorParallelConfig:
    """Derived from the plan when ``parallel.tp > 1``: what the tensor-parallel pass does."""

    size: int
    sequence_parallel: bool = False
    tp_plan: str | Mapping[str, str] | None = "auto"
    divide_attrs: tuple[str, ...] = ()
    loss_parallel: bool = False


@dataclass(frozen=True)
class ContextParallelConfig:
    """Derived from the plan when ``parallel.cp > 1``."""

    size: int


@dataclass(frozen=True)
class AutocastConfig:
    """Derived from the plan when mixed precision is autocast (``who_casts``)."""

    dtype: str  # "bf16" | "fp16"


def who_casts(plan: "Plan") -> str | None:
    """Who applies the plan's mixed precision: None (full precision), "fsdp" or "deepspeed"
    (they cast the parameters themselves: MixedPrecisionPolicy / the DeepSpeed config), or
    "autocast" (torch.autocast around the forward). The one owner of this rule."""
    if plan.mixed_precision == "no":
        return None
    if plan.fsdp is not None:
        return "fsdp"
    if plan.deepspeed is not None:
        return "deepspeed"
    return "autocast"


PARTS: dict[str, type] = {
    "compile": Compile,
    "fp8": FP8,
    "checkpointing": Checkpointing,
    "casting": Casting,
    "parallel": Parallel,
    "fsdp": FSDP,
    "ddp": DDP,
    "deepspeed": DeepSpeed,
    "offload": Offload,
    "pipeline": Pipeline,
}


@dataclass(frozen=True)
class Plan:
    """Everything ``accelerate`` will do to a model. Parts left as ``None`` are off."""

    parallel: Parallel = field(default_factory=Parallel)
    compile: Compile | None = None
    fp8: FP8 | None = None
    checkpointing: Checkpointing | None = None
    casting: Casting | None = None
    fsdp: FSDP | None = None
    ddp: DDP | None = None
    deepspeed: DeepSpeed | None = None
    offload: Offload | None = None
    pipeline: Pipeline | None = None  # used when parallel.pp > 1 (defaults if None)
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    grad_accum: int = 1
    # samples per optimizer step over every data rank: grad_accum is then derived at
    # rt.shard (global batch / (loader batch size × data ranks)), so a resume on another
    # number of ranks keeps the step's samples (docs/checkpointing.md, elastic resume)
    global_batch_size: int | None = None
    # what one optimizer step's loss is the mean over, under rt.forward_backward:
    # "tokens" (every non-ignored label token of the global step), "batch" (the mean of
    # micro-batch means, rt.backward's), "auto" (tokens for batches with labels)
    loss_normalization: str = "auto"
    blocks: tuple[str, ...] | None = None  # qualified names or globs of the repeated blocks
    tp_plan: str | Mapping[str, str] | None = "auto"  # used when parallel.tp > 1
    # integer attributes (e.g. "n_heads") of modules whose children tensor_parallel shards,
    # divided by tp on each rank: for attention that reshapes with a stored head count
    tp_divide_attrs: tuple[str, ...] = ()
    seed: int | None = None  # one seed for shuffling and RNG on every rank
    # a NaN/inf loss or gradient norm (outside fp16) skips the step instead of raising
    skip_nonfinite: bool = False
    # configs of user passes (dataclass instances), each selecting the pass registered for
    # its type: od.Plan(extra=(MyPassConfig(...),))
    extra: tuple[Any, ...] = ()

    # -- conversions ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML friendly except for callables the user put in)."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        return plan_from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Plan":
        return plan_from_file(path)

    @classmethod
    def preset(cls, name: str) -> "Plan":
        return plan_from_preset(name)

    def replace(self, **changes: Any) -> "Plan":
        return validate_plan(replace(self, **changes))

    # -- derived ------------------------------------------------------------------
    @property
    def data_parallel(self) -> str | None:
        """Which data-parallel engine the plan uses: "fsdp", "ddp", "deepspeed" or None."""
        for name in ("fsdp", "ddp", "deepspeed"):
            if getattr(self, name) is not None:
                return name
        return None

    def compile_enabled(self) -> bool:
        return self.compile is not None and self.compile.mode != "off"

    def autocast(self) -> AutocastConfig | None:
        """The autocast config when ``who_casts`` says autocast, else None."""
        return AutocastConfig(self.mixed_precision) if who_casts(self) == "autocast" else None

    def configs(self) -> list[Any]:
        """Every config this plan holds: each runs the pass registered for its type."""
        out: list[Any] = [getattr(self, n) for n in PARTS
                          if n != "parallel" and getattr(self, n) is not None]
        if self.compile is not None and not self.compile_enabled():
            out.remove(self.compile)
        par = self.parallel
        if par.tp > 1:
            out.append(TensorParallelConfig(par.tp, par.sequence_parallel, self.tp_plan,
                                            tuple(self.tp_divide_attrs), par.loss_parallel))
        if par.cp > 1:
            out.append(ContextParallelConfig(par.cp))
        if self.autocast() is not None:
            out.append(self.autocast())
        return out + list(self.extra)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and type(obj) not in (Plan, *PARTS.values()):
        return {type(obj).__name__: {f.name: _to_plain(getattr(obj, f.name))
                                     for f in fields(obj)}}  # a user config: named
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- choices

CHOICES: dict[tuple[str, str], tuple] = {
    ("compile", "mode"): ("regional", "full", "off"),
    ("compile", "compile_mode"): (None, "default", "reduce-overhead", "max-autotune",
                                  "max-autotune-no-cudagraphs"),
    ("fp8", "backend"): ("auto", "torchao", "te"),
    ("fp8", "recipe"): ("tensorwise", "rowwise", "mxfp8"),
    ("checkpointing", "mode"): ("full", "every", "selective", "budget"),
    ("casting", "storage"): ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"),
    ("casting", "compute"): ("bfloat16", "float16", "float32"),
    ("casting", "kernel"): ("auto", "copy", "scaled_mm"),
    ("fsdp", "param_dtype"): (None, "float32", "bfloat16", "float16"),
    ("fsdp", "reduce_dtype"): (None, "float32", "bfloat16", "float16"),
    ("deepspeed", "zero_stage"): (0, 1, 2, 3),
    ("ddp", "comm_hook"): (None, "fp16", "bf16", "powersgd"),
    ("plan", "mixed_precision"): ("no", "bf16", "fp16"),
    ("plan", "loss_normalization"): ("auto", "tokens", "batch"),
    ("offload", "dtype"): (None, "float32", "bfloat16", "float16"),
    ("pipeline", "schedule"): ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs",
                               "zero-bubble", "zbv"),
}

# torch.distributed.pipelining's schedule class for each pipeline.schedule
SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                    "interleaved-1f1b": "ScheduleInterleaved1F1B",
                    "looped-bfs": "ScheduleLoopedBFS",
                    "zero-bubble": "ScheduleInterleavedZeroBubble",
                    "zbv": "ScheduleZBVZeroBubble"}
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # torch's PipelineScheduleSingle
# schedules that need several stages per rank
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b", "looped-bfs", "zbv")


def _choices_error(path: str, value: Any, choices) -> PlanError:
    shown = ", ".join(repr(c) for c in choices)
    return PlanError(f"{path}={value!r} is not valid; choose one of: {shown}")


def _unknown_key_error(path: str, key: str, valid) -> PlanError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return PlanError(
        f"{path}: unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}"
    )


# --------------------------------------------------------------------------- validation


def validate_plan(plan: Plan) -> Plan:
    """Field-level checks that need neither the model nor the world size.

    Returns the plan (so it can be used inline); raises ``PlanError``.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be an overdrive Plan, got {type(plan).__name__}")
    _check_types(plan, "", "plan")
    for name, part_cls in PARTS.items():
        part = getattr(plan, name)
        if part is None:
            continue
        if not isinstance(part, part_cls):
            raise PlanError(
                f"plan.{name} must be od.{part_cls.__name__}(...) or None, got {part!r}"
            )
        _check_types(part, f"{name}.", name)
        for f in fields(part):
            choices = CHOICES.get((name, f.name))
            value = getattr(part, f.name)
            if choices is not None and value not in choices:
                raise _choices_error(f"{name}.{f.name}", value, choices)
    _check_part_values(plan)
    if plan.mixed_precision not in CHOICES[("plan", "mixed_precision")]:
        raise _choices_error("mixed_precision", plan.mixed_precision,
                             CHOICES[("plan", "mixed_precision")])
    if not isinstance(plan.grad_accum, int) or isinstance(plan.grad_accum, bool) \
            or plan.grad_accum < 1:
        raise PlanError(f"grad_accum={plan.grad_accum!r} is not valid; use an integer >= 1")
    _check_batch_fields(plan)
    if plan.blocks is not None:
        if isinstance(plan.blocks, str) or not all(isinstance(b, str) and b for b in plan.blocks):
            raise PlanError(
                f"blocks={plan.blocks!r} is not valid; use a tuple of qualified module names "
                "or globs, e.g. ('model.layers.*',)"
            )
    _check_tp_plan(plan.tp_plan)
    if not isinstance(plan.skip_nonfinite, bool):
        raise PlanError(f"skip_nonfinite={plan.skip_nonfinite!r} is not valid; use True (skip "
                        "steps with a NaN/inf loss, logged) or False (raise NonFiniteError)")
    if plan.skip_nonfinite and plan.deepspeed is not None:
        raise PlanError("skip_nonfinite=True with deepspeed: the DeepSpeed engine owns the "
                        "optimizer step and overdrive cannot skip it; drop skip_nonfinite (a "
                        "NaN/inf loss then raises NonFiniteError) or use DeepSpeed's fp16 loss "
                        "scaling, which skips overflowing steps itself")
    if isinstance(plan.tp_divide_attrs, str) or not all(
            isinstance(a, str) and a.isidentifier() for a in plan.tp_divide_attrs):
        raise PlanError(
            f"tp_divide_attrs={plan.tp_divide_attrs!r} is not valid; use a tuple of attribute "
            "names, e.g. ('n_heads', 'n_kv_heads')"
        )
    if plan.seed is not None and (not isinstance(plan.seed, int) or plan.seed < 0):
        raise PlanError(f"seed={plan.seed!r} is not valid; use a non-negative integer or None")
    _check_extra(plan.extra)
    _check_contradictions(plan)
    return plan


def _check_batch_fields(plan: Plan) -> None:
    """global_batch_size and loss_normalization (the world-size check is in
    ``resolve_for_world``)."""
    if plan.loss_normalization not in CHOICES[("plan", "loss_normalization")]:
        raise _choices_error("loss_normalization", plan.loss_normalization,
                             CHOICES[("plan", "loss_normalization")])
    gbs = plan.global_batch_size
    if gbs is None:
        pass
    elif not isinstance(gbs, int) or isinstance(gbs, bool) or gbs < 1:
        raise PlanError(f"global_batch_size={gbs!r} is not valid; use an integer >= 1 (samples "
                        "per optimizer step over every data rank) or None")
    elif plan.grad_accum != 1:
        raise PlanError(
            f"global_batch_size={gbs} with grad_accum={plan.grad_accum}: grad_accum is derived "
            "from global_batch_size (global batch / (loader batch size × data ranks)); give "
            "one of them")
    elif plan.deepspeed is not None:
        raise PlanError(
            f"global_batch_size={gbs} with deepspeed: the DeepSpeed engine fixes its "
            "accumulation steps when it is built, before rt.shard sees the loader; set "
            "grad_accum (and the loader's batch size) instead")
    elif plan.parallel.pp != 1:
        raise PlanError(
            f"global_batch_size={gbs} with parallel.pp={plan.parallel.pp} is not supported "
            "yet (the pipeline schedule fixes its accumulation when it is built); set "
            "grad_accum instead")
    if plan.loss_normalization == "tokens" and plan.parallel.pp != 1:
        raise PlanError(
            f"loss_normalization='tokens' with parallel.pp={plan.parallel.pp} is not "
            "supported yet (the pipeline schedule computes each micro-batch's loss itself); "
            "use 'batch' or 'auto' (which means 'batch' under pp)")


# what a field's type accepts, for the types checked generically; fields typed otherwise
# (callables, mappings, parts) have their own checks
_ATOMS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false (a boolean: unquoted in YAML)"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null / None"),
}


def _type_rule(hint: Any) -> tuple[Callable[[Any], bool], str] | None:
    """(accepts(value), description) for ``hint``, or None when it is not checked here."""
    if hint in _ATOMS:
        return _ATOMS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _ATOMS:
        item, what = _ATOMS[args[0]]
        return (lambda v: isinstance(v, (tuple, list)) and all(item(x) for x in v),
                f"a list of {what.split(' (')[0].removeprefix('a ').removeprefix('an ')}s")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rules = [_type_rule(a) for a in args]
        if any(r is None for r in rules):
            return None
        return (lambda v: any(ok(v) for ok, _ in rules),
                " or ".join(what for _, what in rules))
    return None


def _check_types(obj: Any, prefix: str, part: str) -> None:
    """Every field holds a value of its declared type: a quoted "false" is not a boolean,
    ``true`` is not the integer 1 (nor ``deepspeed.zero_stage`` 1)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        rule = _type_rule(hints[f.name])
        value = getattr(obj, f.name)
        if rule is not None and not rule[0](value):
            choices = CHOICES.get((part, f.name))
            if choices is not None:
                raise _choices_error(f"{prefix}{f.name}", value, choices)
            raise PlanError(f"{prefix}{f.name}={value!r} is not valid; {prefix}{f.name} takes "
                            f"{rule[1]}")
def _check_extra(extra: Any) -> None:
    if not isinstance(extra, tuple):
        raise PlanError(f"extra={extra!r} is not valid; use a tuple of pass configs, e.g. "
                        "extra=(MyPassConfig(),)")
    seen: set[type] = set()
    for cfg in extra:
        if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
            raise PlanError(f"extra: {cfg!r} is not a config; each entry is an instance of the "
                            "dataclass a pass was registered with (register_pass(config=...))")
        if type(cfg) in seen or type(cfg) in PARTS.values():
            raise PlanError(f"extra: {type(cfg).__name__} appears twice (or is a built-in part; "
                            "set that on its Plan field); give each config once")
        seen.add(type(cfg))


def _check_int(path: str, value: Any, minimum: int, allow_minus_one: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= minimum or (allow_minus_one and value == -1))
    if not ok:
        extra = " or -1 (inferred from the world size)" if allow_minus_one else ""
        raise PlanError(f"{path}={value!r} is not valid; use an integer >= {minimum}{extra}")


def _check_part_values(plan: Plan) -> None:
    par = plan.parallel
    for name in SIZE_NAMES:
        _check_int(f"parallel.{name}", getattr(par, name), 1, allow_minus_one=True)
    inferred = [n for n in SIZE_NAMES if getattr(par, n) == -1]
    if len(inferred) > 1:
        raise PlanError(
            f"parallel: only one size may be -1, got -1 for {', '.join(inferred)}; "
            "give the others explicit sizes"
        )
    if plan.checkpointing is not None:
        ac = plan.checkpointing
        _check_int("checkpointing.every", ac.every, 1)
        if ac.mode == "budget":
            if ac.budget_bytes is None:
                raise PlanError(
                    "checkpointing.budget_bytes=None is not valid with mode='budget'; "
                    "give the activation memory budget in bytes"
                )
            _check_int("checkpointing.budget_bytes", ac.budget_bytes, 0)
    if plan.fp8 is not None and plan.fp8.filter is not None:
        flt = plan.fp8.filter
        if isinstance(flt, str):
            try:
                re.compile(flt)
            except re.error as err:
                raise PlanError(f"fp8.filter={flt!r} is not a valid regex: {err}") from None
        elif not callable(flt):
            raise PlanError(
                f"fp8.filter={flt!r} is not valid; use a regex string or a callable "
                "taking the qualified module name and returning True to convert it"
            )
    if plan.fp8 is not None and plan.fp8.recipe == "mxfp8" and plan.fp8.backend == "torchao":
        raise PlanError(
            "fp8.recipe='mxfp8' is not available with fp8.backend='torchao' training; "
            "use backend='te' (NVIDIA Blackwell) or recipe 'tensorwise' / 'rowwise'"
        )
    if plan.casting is not None and isinstance(plan.casting.skip, str):
        raise PlanError(
            f"casting.skip={plan.casting.skip!r} must be a tuple of name fragments, "
            "e.g. ('norm', 'embed', 'lm_head')"
        )
    if plan.deepspeed is not None:
        cfg = plan.deepspeed.config
        if cfg is not None and not isinstance(cfg, (Mapping, str, os.PathLike)):
            raise PlanError(
                f"deepspeed.config={cfg!r} is not valid; use None, a dict or a JSON path"
            )
        if isinstance(cfg, (str, os.PathLike)) and not os.path.isfile(cfg):
            raise PlanError(f"deepspeed.config={str(cfg)!r}: no such file")
        clip = plan.deepspeed.gradient_clipping
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or clip <= 0):
            raise PlanError(f"deepspeed.gradient_clipping={clip!r} is not valid; use a "
                            "positive max norm such as 1.0, or None")
    if plan.offload is not None:
        _check_offload(plan.offload)
    if plan.ddp is not None:
        _check_int("ddp.bucket_cap_mb", plan.ddp.bucket_cap_mb, 1)
        _check_comm_hook(plan)
    if plan.pipeline is not None:
        _check_pipeline_values(plan.pipeline)


def _check_offload(cfg: Offload) -> None:
    dm = cfg.device_map
    modes = ("auto", "balanced", "balanced_low_0", "sequential")
    if isinstance(dm, str) and dm not in modes:
        raise _choices_error("offload.device_map", dm, modes + ("{module: device}",))
    if not isinstance(dm, (str, Mapping)):
        raise PlanError(f"offload.device_map={dm!r} is not valid; use one of {modes} or a "
                        "dict {module FQN: 'cuda:0' | 'cpu' | 'disk'}")
    if cfg.max_memory is not None and not isinstance(cfg.max_memory, Mapping):
        raise PlanError(f"offload.max_memory={cfg.max_memory!r} is not valid; use a dict "
                        "{device: bytes or '10GiB'}, e.g. {'cpu': '8GiB', 'disk': '100GiB'}")
    if cfg.no_split is not None and (isinstance(cfg.no_split, str) or not all(
            isinstance(c, str) for c in cfg.no_split)):
        raise PlanError(f"offload.no_split={cfg.no_split!r} must be a tuple of class names, "
                        "e.g. ('LlamaDecoderLayer',)")
    _check_int("offload.prefetch", cfg.prefetch, 0)
    folder = cfg.offload_folder
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise PlanError(f"offload.offload_folder={folder!r} is not valid; use a directory path")


def _check_comm_hook(plan: Plan) -> None:
    """ddp.comm_hook and its PowerSGD settings (checked before the engine contradictions:
    the message says what fsdp offers instead)."""
    ddp = plan.ddp
    _check_int("ddp.powersgd_rank", ddp.powersgd_rank, 1)
    _check_int("ddp.powersgd_start_iter", ddp.powersgd_start_iter, 1)
    if ddp.comm_hook != "powersgd" and (ddp.powersgd_rank, ddp.powersgd_start_iter) != (1, 1000):
        raise PlanError(
            f"ddp.powersgd_rank={ddp.powersgd_rank}, ddp.powersgd_start_iter="
            f"{ddp.powersgd_start_iter} only apply with ddp.comm_hook='powersgd' (comm_hook="
            f"{ddp.comm_hook!r}); set comm_hook='powersgd' or leave them at 1 and 1000")
    if ddp.comm_hook == "powersgd" and ddp.powersgd_start_iter < 2:
        raise PlanError(
            f"ddp.powersgd_start_iter={ddp.powersgd_start_iter} is not valid: PowerSGD's error "
            "feedback needs at least 2 plain all-reduce steps first; use >= 2")
    if ddp.comm_hook is not None and plan.fsdp is not None:
        raise PlanError(
            f"ddp.comm_hook={ddp.comm_hook!r} is a DDP communication hook and the plan uses "
            "fsdp, which reduce-scatters its own way; drop ddp (fsdp compresses its "
            "reduction with od.FSDP(reduce_dtype='bfloat16'))")


def _check_pipeline_values(pipe: "Pipeline") -> None:
    _check_int("pipeline.stages_per_rank", pipe.stages_per_rank, 1)
    if pipe.microbatches is not None:
        _check_int("pipeline.microbatches", pipe.microbatches, 1)
    if pipe.schedule in MULTI_STAGE_SCHEDULES and pipe.stages_per_rank < 2:
        raise PlanError(
            f"pipeline.schedule={pipe.schedule!r} runs several stages per rank and needs "
            f"pipeline.stages_per_rank >= 2 (got {pipe.stages_per_rank}); set "
            "stages_per_rank=2, or use schedule='1f1b' / 'gpipe' with one stage per rank")
    if pipe.schedule == "zbv" and pipe.stages_per_rank != 2:
        raise PlanError(
            f"pipeline.schedule='zbv' needs exactly pipeline.stages_per_rank=2 (its V shape "
            f"puts two stages on every rank), got {pipe.stages_per_rank}")
    if pipe.schedule in ("gpipe", "1f1b") and pipe.stages_per_rank != 1:
        raise PlanError(
            f"pipeline.schedule={pipe.schedule!r} runs one stage per rank; "
            f"pipeline.stages_per_rank={pipe.stages_per_rank} needs 'interleaved-1f1b', "
            "'looped-bfs', 'zero-bubble' or 'zbv'")
    split = pipe.split
    if split is not None:
        if isinstance(split, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in split):
            raise PlanError(
                f"pipeline.split={split!r} is not valid; use None (balanced) or a tuple of "
                "the block indices where stages begin, e.g. (0, 2) for two stages of a "
                "4-block model")
        if list(split) != sorted(set(split)):
            raise PlanError(f"pipeline.split={split!r} must be strictly increasing block "
                            "indices, e.g. (0, 2)")


TP_STYLES = ("colwise", "rowwise", "sequence_parallel", "colwise_rep", "rowwise_rep",
             "embedding_rowwise")


def _check_tp_plan(tp_plan: Any) -> None:
    if tp_plan is None or tp_plan == "auto":
        return
    if isinstance(tp_plan, str):
        raise PlanError(
            f"tp_plan={tp_plan!r} is not valid; use 'auto' or a dict "
            "{module glob: style}, e.g. {'layers.*.attn.q_proj': 'colwise'}"
        )
    if not isinstance(tp_plan, Mapping):
        raise PlanError(f"tp_plan must be 'auto' or a dict, got {type(tp_plan).__name__}")
    for glob, style in tp_plan.items():
        if style not in TP_STYLES:
            raise _choices_error(f"tp_plan[{glob!r}]", style, TP_STYLES)


def _check_contradictions(plan: Plan) -> None:
    engines = [n for n in ("fsdp", "ddp", "deepspeed") if getattr(plan, n) is not None]
    if len(engines) > 1:
        raise PlanError(
            f"plan enables {' and '.join(engines)} together; choose one data-parallel engine "
            "(fsdp, ddp or deepspeed)"
        )
    par = plan.parallel
    if plan.pipeline is not None and par.pp == 1:
        raise PlanError(
            "plan.pipeline is set but parallel.pp=1; set parallel.pp >= 2 (e.g. the 'pp' "
            "preset) or drop plan.pipeline")
    if par.pp != 1:
        if plan.deepspeed is not None:
            raise PlanError(
                f"deepspeed with parallel.pp={par.pp} is not supported (DeepSpeed's engine "
                "owns the whole model); use fsdp with pp (e.g. 'fsdp+pp') or set pp=1")
        if plan.ddp is not None:
            raise PlanError(
                f"ddp with parallel.pp={par.pp} is not supported; use fsdp for the "
                "data-parallel ranks of a pipeline (e.g. 'fsdp+pp')")
        if plan.casting is not None:
            raise PlanError(
                f"casting with parallel.pp={par.pp} is not valid: casting is for inference "
                "and pipeline parallelism is for training; drop one of them")
        if plan.mixed_precision == "fp16":
            raise PlanError(
                f"mixed_precision='fp16' with parallel.pp={par.pp} is not supported (the "
                "loss scaler cannot see the pipeline's backward); use 'bf16'")
        if par.cp != 1:
            raise PlanError(
                f"parallel.cp={par.cp} with parallel.pp={par.pp} is not supported yet; "
                "set cp=1 or pp=1")
    if plan.deepspeed is not None and (par.tp not in (1,) or par.cp != 1):
        raise PlanError(
            f"deepspeed with parallel.tp={par.tp}, parallel.cp={par.cp} is not supported; "
            "use fsdp for 2-D/3-D parallelism or set tp=1, cp=1"
        )
    if plan.casting is not None and plan.fp8 is not None:
        raise PlanError(
            "casting and fp8 together are not valid: casting is for inference, fp8 for "
            "training; drop one of them"
        )
    if plan.casting is not None and (plan.fsdp or plan.deepspeed or plan.ddp):
        raise PlanError(
            "casting is an inference pass and cannot be combined with "
            f"{plan.data_parallel}; drop one of them"
        )
    if plan.offload is not None:
        others = [n for n in ("fsdp", "ddp", "deepspeed") if getattr(plan, n) is not None]
        others += [f"parallel.{n}={getattr(par, n)}" for n in ("tp", "cp", "pp")
                   if getattr(par, n) not in (1,)]
        if others:
            raise PlanError(
                f"offload is an inference pass (one process places the model across its "
                f"devices) and cannot be combined with {', '.join(others)}; drop one of them")
    if par.sequence_parallel and par.tp == 1:
        raise PlanError(
            "parallel.sequence_parallel=True needs parallel.tp > 1 (it shards the norms' "
            "activations across the tensor-parallel ranks)"
        )
    if par.loss_parallel and par.tp == 1:
        raise PlanError(
            "parallel.loss_parallel=True needs parallel.tp > 1 (it keeps the logits split on "
            "the vocabulary across the tensor-parallel ranks); set parallel.tp > 1 or "
            "loss_parallel=False")
    if par.loss_parallel and par.pp > 1:
        raise PlanError(
            f"parallel.loss_parallel=True with parallel.pp={par.pp}: the pipeline's last "
            "stage computes the loss outside the loss_parallel context overdrive owns; use "
            "loss_parallel=False with pp > 1")


SIZE_NAMES = ("pp", "dp_replicate", "dp_shard", "tp", "cp")


def derive_grad_accum(global_batch_size: int, batch_size: int, dp_size: int,
                      split_batches: bool = False) -> int:
    """``Plan(global_batch_size=G)``'s grad_accum: G / (the samples one micro-step takes
    over every data rank: the loader's ``batch_size`` × ``dp_size``, or ``batch_size``
    with ``split_batches``). The one owner of the rule (``rt.shard``, ``od.inspect``)."""
    per_micro = batch_size if split_batches else batch_size * dp_size
    if global_batch_size % per_micro == 0:
        return global_batch_size // per_micro
    ranks = 1 if split_batches else dp_size
    fits = [b for b in range(1, global_batch_size + 1) if global_batch_size % (b * ranks) == 0]
    how = (f"batch size {batch_size} (split_batches)" if split_batches else
           f"batch size {batch_size} × {dp_size} data rank(s)")
    raise PlanError(
        f"global_batch_size={global_batch_size} is not divisible by the loader's {how} = "
        f"{per_micro} samples per micro-step, so grad_accum cannot be derived; give the "
        f"DataLoader a batch_size in {fits[:8]} or change global_batch_size")


def resolve_sizes(parallel: Parallel, world_size: int) -> Parallel:
    """Fill the one -1 size and check the product equals the world size."""
    sizes = {n: getattr(parallel, n) for n in SIZE_NAMES}
    known = 1
    for v in sizes.values():
        if v != -1:
            known *= v
    missing = [n for n, v in sizes.items() if v == -1]
    if missing:
        if world_size % known != 0:
            others = " × ".join(f"{n}={v}" for n, v in sizes.items() if v != -1 and v != 1)
            raise PlanError(
                f"parallel.{missing[0]}=-1 cannot be inferred: world size {world_size} is not "
                f"divisible by the product of the other sizes ({others} = {known}); launch a "
                f"multiple of {known} processes (e.g. torchrun --nproc-per-node={known}), or "
                "lower those sizes"
            )
        sizes[missing[0]] = world_size // known
    product = 1
    for v in sizes.values():
        product *= v
    if product != world_size:
        desc = " × ".join(f"{n}={v}" for n, v in sizes.items())
        raise PlanError(
            f"parallel sizes {desc} = {product} do not match the world size {world_size}; "
            "make their product equal the number of processes (one size may be -1)"
        )
    return replace(parallel, **sizes)


def resolve_for_world(plan: Plan, world_size: int) -> Plan:
    """The plan with concrete mesh sizes for ``world_size`` processes.

    When the data-parallel size is > 1 and the plan names no data-parallel engine, one is
    turned on — ranks that each train alone on their slice would silently diverge: ddp,
    or fsdp when tp > 1 (DDP cannot keep tensor-parallel DTensor parameters; the ``tp``
    preset means "tp=2, the other ranks on dp_shard", i.e. FSDP's dimension).
    """
    plan = replace(plan, parallel=resolve_sizes(plan.parallel, world_size))
    dp = plan.parallel.dp_replicate * plan.parallel.dp_shard
    gbs = plan.global_batch_size
    if gbs is not None and gbs % dp:
        raise PlanError(
            f"global_batch_size={gbs} is not divisible by the {dp} data-parallel ranks of "
            f"this world ({world_size} processes); use a multiple of {dp} (e.g. "
            f"{(gbs // dp + 1) * dp}) or launch a number of data ranks that divides {gbs}")
    if dp > 1 and plan.data_parallel is None and plan.casting is None \
            and plan.offload is None:
        fsdp = plan.parallel.tp > 1 or plan.parallel.pp > 1  # pipeline stages: fsdp too
        plan = replace(plan, fsdp=FSDP()) if fsdp else replace(plan, ddp=DDP())
    if plan.parallel.pp > 1 and plan.pipeline is None:
        plan = replace(plan, pipeline=Pipeline())
    return plan


# --------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=None)
def tuple_fields(cls: type) -> frozenset[str]:
    """Fields of dataclass ``cls`` typed as tuples (``tuple[str, ...] | None`` too): YAML
    and JSON give them back as lists, which would break equality and hashing."""
    def is_tuple(hint) -> bool:
        return typing.get_origin(hint) is tuple or any(
            typing.get_origin(arg) is tuple for arg in typing.get_args(hint))

    return frozenset(n for n, h in typing.get_type_hints(cls).items() if is_tuple(h))


def _part_from_value(name: str, value: Any):
    cls = PARTS[name]
    if value is None or value is False:
        return None if name != "parallel" else Parallel()
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if name == "compile" and isinstance(value, str):
        return Compile(mode=value)
    if name == "checkpointing" and isinstance(value, str):
        return Checkpointing(mode=value)
    if name == "deepspeed" and isinstance(value, int):
        return DeepSpeed(zero_stage=value)
    if not isinstance(value, Mapping):
        raise PlanError(
            f"plan.{name}={value!r} is not valid; use a dict of {cls.__name__} fields, "
            "true/false, or null"
        )
    valid = {f.name for f in fields(cls)}
    for key in value:
        if key not in valid:
            raise _unknown_key_error(name, key, valid)
    tuples = tuple_fields(cls)
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v
                  for k, v in value.items()})


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    if not isinstance(data, Mapping):
        raise PlanError(f"a plan dict is expected, got {type(data).__name__}")
    valid = {f.name for f in fields(Plan)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key_error("plan", key, valid)
        if key in PARTS:
            kwargs[key] = _part_from_value(key, value)
        elif key in tuple_fields(Plan) and value is not None:
            kwargs[key] = (value,) if isinstance(value, str) else tuple(value)
        else:
            kwargs[key] = value
    return validate_plan(Plan(**kwargs))


PLAN_SUFFIXES = (".yaml", ".yml", ".json")


def is_plan_path(plan: str) -> bool:
    """A string naming a plan file (any case: ``P.YAML`` too), not a preset."""
    return plan.lower().endswith(PLAN_SUFFIXES)


def read_plan_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise PlanError(f"plan file {path!r}: no such file; give the path of a YAML/JSON "
                        "plan or a preset such as 'fsdp+compile'") from None
    except UnicodeDecodeError as err:
        raise PlanError(f"plan file {path!r} is not UTF-8 text ({err.reason} at byte "
                        f"{err.start}); save it as UTF-8 YAML or JSON") from None
    except OSError as err:
        raise PlanError(f"plan file {path!r} cannot be read: {err.strerror or err}") from None


def plan_from_file(path: str | os.PathLike) -> Plan:
    path = os.fspath(path)
    text = read_plan_text(path)
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path!r} is not valid JSON: {err}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PlanError(f"plan file {path!r} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    return plan_from_dict(data)


# --------------------------------------------------------------------------- presets

_SIMPLE_TOKENS: dict[str, dict[str, Any]] = {
    "none": {},
    "ddp": {"ddp": DDP()},
    "fsdp": {"fsdp": FSDP()},
    "hsdp": {"fsdp": FSDP(), "parallel": {"dp_replicate": 2}},
    "zero1": {"deepspeed": DeepSpeed(zero_stage=1)},
    "zero2": {"deepspeed": DeepSpeed(zero_stage=2)},
    "zero3": {"deepspeed": DeepSpeed(zero_stage=3)},
    "deepspeed": {"deepspeed": DeepSpeed()},
    "compile": {"compile": Compile(mode="regional")},
    "compile-full": {"compile": Compile(mode="full")},
    "ac": {"checkpointing": Checkpointing(mode="full")},
    "sac": {"checkpointing": Checkpointing(mode="selective")},
    "fp8": {"fp8": FP8()},
    "bf16": {"mixed_precision": "bf16"},
    "fp16": {"mixed_precision": "fp16"},
    "sp": {"parallel": {"sequence_parallel": True}},
    "inference-fp8": {"casting": Casting()},
    "casting": {"casting": Casting()},
    "offload": {"offload": Offload()},
}
_SIZED_TOKENS = {"tp": ("tp", 2), "cp": ("cp", 2), "pp": ("pp", 2)}  # "tp" = tp2, "tp4" = 4

PRESETS = tuple(_SIMPLE_TOKENS) + ("tp", "tpN", "cp", "cpN", "pp", "ppN")


def plan_from_preset(name: str) -> Plan:
    """``"fsdp+compile+ac+fp8"``, ``"fsdp+tp4"``, ``"ddp"``… tokens joined with ``+``."""
    tokens = [t.strip().lower() for t in name.split("+")]
    kwargs: dict[str, Any] = {}
    parallel: dict[str, Any] = {}
    for tok in tokens:
        if tok in _SIMPLE_TOKENS:
            for key, value in _SIMPLE_TOKENS[tok].items():
                if key == "parallel":
                    parallel.update(value)
                elif key in kwargs and kwargs[key] != value:
                    raise PlanError(f"preset {name!r}: '{tok}' contradicts an earlier token")
                else:
                    kwargs[key] = value
            continue
        m = re.fullmatch(r"(tp|cp|pp)(\d*)", tok)
        if m:
            dim, default = _SIZED_TOKENS[m.group(1)]
            size = int(m.group(2)) if m.group(2) else default
            if size < 1:
                raise PlanError(f"preset {name!r}: '{tok}' needs a size >= 1")
            parallel[dim] = size
            continue
        close = difflib.get_close_matches(tok, PRESETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PlanError(
            f"plan={name!r}: unknown preset token '{tok}'.{hint} Tokens (joined with '+'): "
            f"{', '.join(PRESETS)}"
        )
    if parallel:
        kwargs["parallel"] = Parallel(**parallel)
    return validate_plan(Plan(**kwargs))


def resolve_plan(plan: Plan | Mapping[str, Any] | str | os.PathLike | None) -> Plan:
    """Whatever the user handed in → one frozen, validated ``Plan``."""
    if plan is None:
        return validate_plan(Plan())
    if isinstance(plan, Plan):
        return validate_plan(plan)
    if isinstance(plan, Mapping):
        return plan_from_dict(plan)
    if isinstance(plan, os.PathLike):
        return plan_from_file(plan)
    if isinstance(plan, str):
        if is_plan_path(plan):
            if not os.path.isfile(plan):
                raise PlanError(f"plan={plan!r}: no such plan file")
            return plan_from_file(plan)
        return plan_from_preset(plan)
    raise PlanError(
        f"plan={plan!r} is not valid; use an od.Plan, a dict, a YAML/JSON path or a preset "
        "string such as 'fsdp+compile'"
    )

