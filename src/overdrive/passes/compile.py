"""``torch.compile``, regional (per repeated block) or of the whole model, in place.

regional  ``block.compile(...)`` on every block: the block stays the same object of the
          same class with the same hooks and parameter names; only its ``__call__`` goes
          through the compiled code. Identical blocks share one compiled graph (dynamo
          caches per code object and treats module parameters as inputs), so the cold
          start costs about one block's compile. Embeddings, final norm and head stay eager.
full      ``model.compile(...)`` on the root: no ``_orig_mod.`` wrapper, keys unchanged.

No blocks found → regional falls back to full, with a note in the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..plan import Compile
from ..rewrite.contract import Decision, Pass, PassContext
from ..rewrite.graph import ModuleGraph
from ..rewrite.manager import register_pass

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


def check_compile(cfg: Compile, env: Any) -> None:
    if not isinstance(cfg.fullgraph, bool):
        raise PlanError(f"compile.fullgraph={cfg.fullgraph!r} is not valid; use True or False")
    if cfg.dynamic not in (None, True, False):
        raise PlanError(f"compile.dynamic={cfg.dynamic!r} is not valid; use None, True or False")
    _check_backend(cfg, env)
    _check_options(cfg)


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class CompileDecision(Decision):
    """``modules``: the regions compiled (``""``: the root); ``mode``: what is done
    ("full" when regional found no blocks); ``kwargs``: what ``module.compile`` gets."""

    mode: str
    kwargs: dict[str, Any]


def decide(graph: ModuleGraph, cfg: Compile) -> CompileDecision:
    """The regions and arguments, from the graph and the config alone."""
    names, notes = targets(graph, cfg)
    fell_back = cfg.mode == "regional" and names == [""]
    mode = "full" if fell_back else cfg.mode
    return CompileDecision(
        modules=names, notes=notes, mode=mode, kwargs=compile_kwargs(cfg),
        details={"mode": mode, "requested_mode": cfg.mode, "backend": str(cfg.backend)})


@register_pass("compile", config=Compile, after=("checkpointing",),
               before=("fsdp", "ddp", "deepspeed"))
class CompilePass(Pass):
    """Compile each repeated block (regional) or the root (full) with ``module.compile``."""

    def check(self, ctx: PassContext) -> CompileDecision:
        check_compile(ctx.cfg, ctx.env)
        return decide(ctx.graph, ctx.cfg)

    def apply(self, model: nn.Module, decision: CompileDecision, ctx: PassContext) -> None:
        for name in decision.modules:  # "" is the root
            compile_in_place(model if name == "" else ctx.graph.module(name),
                             **decision.kwargs)


__all__ = ["CompilePass", "CompileDecision", "decide", "compile_kwargs", "targets", "check_compile", "available_backends",
           "compile_in_place"]
