"""``torch.compile``, regional (per repeated block) or of the whole model, in place.

regional  ``block.compile(...)`` on every block: the block stays the same object of the
          same class with the same hooks and parameter names; only its ``__call__`` goes
          through the compiled code. Identical blocks share one compiled graph (dynamo
          caches per code object and treats module parameters as inputs), so the cold
          start costs about one block's compile. Embeddings, final norm and head stay eager.
full      ``model.compile(...)`` on the root: no ``_orig_mod.`` wrapper, keys unchanged.

No blocks found → regional falls back to full, with a note in the record.

Warm starts (``Compile(cache=True)``, the default): ``check`` fingerprints the plan, the
model's structure, torch and the device kind (compile_cache.py); ``apply`` loads that
bundle of torch's compile cache artifacts from ``Compile.cache_dir`` before compiling, and
the pass's post-step hook (compile_watch.py) writes it after the first optimizer step,
when that step compiled something torch's caches did not hold. The same hook confirms
that every region ran compiled code, and counts and explains recompiles after step 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..plan_spec import Compile
from ..rewrite.contract import Applied, Decision, Pass, PassContext
from ..rewrite.env import mesh_coordinates
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import register_pass
from . import compile_cache
from .compile_watch import CacheTarget, CompileWatch, mark_compiled

log = logging.getLogger("overdrive")

# backends torch.compile knows by name even when list_backends() hides them
KNOWN_BACKENDS = ("inductor", "eager", "aot_eager", "aot_eager_decomp_partition", "cudagraphs")


def available_backends() -> list[str]:
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends(exclude_tags=())) | set(KNOWN_BACKENDS))


def compile_kwargs(cfg: Compile) -> dict[str, Any]:
    """The arguments handed to ``module.compile``."""
    kwargs: dict[str, Any] = {"backend": cfg.backend, "fullgraph": cfg.fullgraph,
                              "dynamic": cfg.dynamic}
    if cfg.compile_mode is not None:
        kwargs["mode"] = cfg.compile_mode
    if cfg.options:
        kwargs["options"] = dict(cfg.options)
    return kwargs


def targets(graph: ModuleGraph, cfg: Compile) -> tuple[list[str], list[str]]:
    """(qualified names to compile, notes). ``""`` is the root."""
    if cfg.mode == "full":
        return [""], ["full: the whole model is compiled as one region"]
    blocks = graph.blocks()
    if not blocks:
        return [""], ["regional: no repeated blocks found; fell back to compiling the whole "
                      "model (set Plan.blocks to choose the regions)"]
    leftovers = graph.non_block_leaves()
    notes = [f"regional: {len(blocks)} blocks compiled in place; identical blocks share one "
             "compiled graph"]
    if leftovers:
        notes.append(f"eager (outside the blocks): {', '.join(leftovers)}")
    return blocks, notes


# --------------------------------------------------------------------------- in place


def _forward_in_skipfiles(module: nn.Module) -> bool:
    """True for modules whose code dynamo will not trace as a top frame (torch.nn's own:
    Sequential, TransformerEncoderLayer…): ``module.compile()`` alone would silently run
    them eagerly."""
    from torch._dynamo import trace_rules

    try:
        return bool(trace_rules.check(module.forward))
    except Exception:  # noqa: BLE001 - private API; assume traceable
        return False


def _traceable_call(module: nn.Module):
    call = module._call_impl

    def overdrive_compiled_call(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    return overdrive_compiled_call


def compile_in_place(module: nn.Module, **kwargs: Any) -> None:
    """``module.compile(**kwargs)``: same object, class, hooks and keys. torch.nn's own
    modules get a traceable entry frame (what ``torch.compile(module)`` does for them)."""
    if _forward_in_skipfiles(module):
        module._compiled_call_impl = torch.compile(_traceable_call(module), **kwargs)
    else:
        module.compile(**kwargs)


# --------------------------------------------------------------------------- validation


def _check_backend(cfg: Compile, env: Any) -> None:
    backend = cfg.backend
    if callable(backend):
        return
    if not isinstance(backend, str) or backend not in available_backends():
        raise PlanError(
            f"compile.backend={backend!r} is not a torch.compile backend; choose one of: "
            f"{', '.join(available_backends())} (or register one with "
            "torch._dynamo.register_backend)"
        )
    if backend != "inductor" and cfg.compile_mode not in (None, "default"):
        raise PlanError(
            f"compile.compile_mode={cfg.compile_mode!r} is an inductor mode and does nothing "
            f"with compile.backend={backend!r}; use backend='inductor' or compile_mode=None"
        )
    if backend == "inductor" and not getattr(env, "dry_run", False):
        _check_inductor_toolchain(env.device)


def _check_inductor_toolchain(device: torch.device) -> None:
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as err:  # noqa: BLE001 - torch raises several kinds here
            raise BackendUnavailable(
                "compile.backend='inductor' on CPU needs a C++ compiler (g++ or clang++) on "
                f"PATH ({err}); install one, or use compile.backend='aot_eager'"
            ) from None
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise BackendUnavailable(
                "compile.backend='inductor' on CUDA needs triton; `pip install triton` "
                "(it ships with the CUDA torch wheels), or use compile.backend='aot_eager'"
            )


def _check_options(cfg: Compile) -> None:
    if cfg.options is None:
        return
    if not isinstance(cfg.options, Mapping):
        raise PlanError(f"compile.options={cfg.options!r} is not valid; use a dict of "
                        "inductor config options, e.g. {'max_autotune': True}")
    if cfg.compile_mode is not None:
        raise PlanError(
            f"compile.compile_mode={cfg.compile_mode!r} and compile.options together are not "
            "valid (torch.compile takes one or the other); drop one of them"
        )
    if cfg.backend == "inductor":
        from torch._inductor import config

        known = config.get_config_copy()
        for key in cfg.options:
            if str(key).replace("-", "_") not in known:
                raise PlanError(f"compile.options: {key!r} is not an inductor config option "
                                "(see torch._inductor.config)")


def _check_cache(cfg: Compile) -> None:
    if not isinstance(cfg.cache, bool):
        raise PlanError(f"compile.cache={cfg.cache!r} is not valid; use True (warm starts "
                        "from the compile cache) or False")
    if cfg.cache_dir is not None and not isinstance(cfg.cache_dir, (str, Path)):
        raise PlanError(f"compile.cache_dir={cfg.cache_dir!r} is not valid; use a directory "
                        "path (str) or None for the default "
                        f"({compile_cache.default_cache_dir()})")
    if cfg.cache_dir is not None and Path(cfg.cache_dir).exists() \
            and not Path(cfg.cache_dir).is_dir():
        raise PlanError(f"compile.cache_dir={str(cfg.cache_dir)!r} is a file, not a "
                        "directory; point it at a directory (it is created when missing)")


def check_compile(cfg: Compile, env: Any) -> None:
    if not isinstance(cfg.fullgraph, bool):
        raise PlanError(f"compile.fullgraph={cfg.fullgraph!r} is not valid; use True or False")
    if cfg.dynamic not in (None, True, False):
        raise PlanError(f"compile.dynamic={cfg.dynamic!r} is not valid; use None, True or False")
    _check_backend(cfg, env)
    _check_options(cfg)
    _check_cache(cfg)


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class CompileDecision(Decision):
    """``modules``: the regions compiled (``""``: the root); ``mode``: what is done
    ("full" when regional found no blocks); ``kwargs``: what ``module.compile`` gets;
    ``cache_file``: the warm-start bundle this plan and model map to (None: no cache)."""

    mode: str
    kwargs: dict[str, Any]
    cache_file: str | None = None
    cache_key: str | None = None


def decide(graph: ModuleGraph, cfg: Compile, plan: Any = None, env: Any = None) -> CompileDecision:
    """The regions and arguments, from the graph and the config (and, for the cache key,
    the plan and the world) alone."""
    names, notes = targets(graph, cfg)
    fell_back = cfg.mode == "regional" and names == [""]
    mode = "full" if fell_back else cfg.mode
    details: dict[str, Any] = {"mode": mode, "requested_mode": cfg.mode,
                               "backend": str(cfg.backend)}
    cache_file = key = None
    if cfg.cache and plan is not None and env is not None:
        coords = mesh_coordinates(env.rank, env.parallel)
        place = {dim: coords[dim] for dim in ("pp", "cp", "tp")}
        key = compile_cache.fingerprint(plan, graph.model, env.device, env.world_size, place)
        folder = Path(cfg.cache_dir) if cfg.cache_dir is not None \
            else compile_cache.default_cache_dir()
        cache_file = str(folder / f"{key}.zip")
        details["cache_file"] = cache_file
        notes = [*notes, f"compile cache: {cache_file} (loaded before compiling when "
                 "present, written after the first optimizer step)"]
    return CompileDecision(modules=names, notes=notes, mode=mode, kwargs=compile_kwargs(cfg),
                           cache_file=cache_file, cache_key=key, details=details)


@register_pass("compile", config=Compile, after=("checkpointing",),
               before=("fsdp", "ddp", "deepspeed"))
class CompilePass(Pass):
    """Compile each repeated block (regional) or the root (full) with ``module.compile``."""

    def check(self, ctx: PassContext) -> CompileDecision:
        check_compile(ctx.cfg, ctx.env)
        return decide(ctx.graph, ctx.cfg, ctx.plan, ctx.env)

    def apply(self, model: nn.Module, decision: CompileDecision, ctx: PassContext) -> Applied:
        record = self.preview(decision, ctx)
        cache = _load_cache(decision, record, is_main=ctx.env.rank == 0)
        regions = {name: model if name == "" else ctx.graph.module(name)
                   for name in decision.modules}  # "" is the root
        # one writer per bundle: the first data-parallel rank of each pp/cp/tp place
        watch = CompileWatch(record, regions, str(decision.kwargs["backend"]), cache,
                             is_main=ctx.env.rank == 0, writes=ctx.env.dp_rank == 0)
        for module in regions.values():
            module.register_forward_pre_hook(mark_compiled)
            compile_in_place(module, **decision.kwargs)
        return Applied(record, post_step_hooks=[watch])


def _load_cache(decision: CompileDecision, record: Any, *, is_main: bool) -> CacheTarget | None:
    """The bundle loaded into torch's caches (a hit), or a miss; None without a cache."""
    if decision.cache_file is None or decision.cache_key is None:
        return None
    path = Path(decision.cache_file)
    loaded = compile_cache.load_bundle(path)
    record.details["cache"] = "hit" if loaded.hit else "miss"
    record.details["cache_load_seconds"] = round(loaded.seconds, 3)
    if loaded.hit:
        record.note(f"compile cache hit: {path.name} ({loaded.kernels} kernel libraries, "
                    f"artifacts {loaded.artifacts}) loaded in {loaded.seconds:.2f} s")
    if loaded.problem:
        record.note(f"compile cache not used: {loaded.problem}")
        if is_main:
            log.warning("compile: cache not used: %s", loaded.problem)
    return CacheTarget(path, decision.cache_key, loaded)


__all__ = ["CompilePass", "CompileDecision", "decide", "compile_kwargs", "targets", "check_compile", "available_backends",
           "compile_in_place"]
