"""What the compile pass checks once the model has run: a post-step hook.

After the first optimizer step it records in the compile pass's ``PassRecord``
(``rt.report["compile"].details``): the compile seconds and graphs of that step, whether
each compiled region really ran compiled code, and the cache's outcome; it writes the warm
start bundle (the one place that does, passes/compile_cache.py). After every later step it
counts recompiles and warns with the guard that failed.

Ran compiled code: every compiled region gets a forward pre-hook that stores
``torch.compiler.is_compiling()`` on the module. Inside dynamo-compiled code that value is
the constant True, replayed as a side effect each time the compiled code runs; a region
that dynamo skipped or that fell back to eager stores False (Accelerate's issues
4188/4253: regional compile that silently ran eager code).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..rewrite.report import PassRecord
from . import compile_cache

log = logging.getLogger("overdrive")

MARK = "_overdrive_ran_compiled"


def mark_compiled(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of every compiled region (one function for all: no per-region
    closure for dynamo to guard on)."""
    setattr(module, MARK, torch.compiler.is_compiling())


def ran_compiled(module: nn.Module) -> bool | None:
    """True / False after a forward of ``module``; None when it was not called."""
    return module.__dict__.get(MARK)


def _now_us() -> int:
    return time.time_ns() // 1000


def _compiles_since(start_us: int) -> list[Any]:
    from torch._dynamo.utils import get_compilation_metrics

    return [m for m in get_compilation_metrics() if (m.start_time_us or 0) >= start_us]


def _counter(group: str, key: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters[group][key])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _cache_misses() -> int:
    return _counter("inductor", "fxgraph_cache_miss") + \
        _counter("aot_autograd", "autograd_cache_miss")


def _cache_hits() -> int:
    return _counter("inductor", "fxgraph_cache_hit") + \
        _counter("aot_autograd", "autograd_cache_hit")


def guard_of(reason: str) -> str:
    """The first line of dynamo's recompile reason without its ``0/0: `` prefix."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    head, sep, rest = first.partition(": ")
    return rest.strip() if sep and "/" in head and " " not in head else first.strip()


@dataclass
class CacheTarget:
    """Where this run's bundle lives and what loading it gave."""

    path: Path
    key: str
    loaded: compile_cache.LoadResult


@dataclass
class CompileWatch:
    """The compile pass's post-step hook: ``watch(model, optimizer)``."""

    record: PassRecord
    regions: dict[str, nn.Module]
    backend: str
    cache: CacheTarget | None
    is_main: bool
    writes: bool = True  # this rank writes the bundle (its data-parallel peers do not)
    started_us: int = field(default_factory=_now_us)
    graphs_before: int = field(default_factory=lambda: _counter("stats", "unique_graphs"))
    breaks_before: int = field(default_factory=_graph_breaks)
    misses_before: int = field(default_factory=_cache_misses)
    hits_before: int = field(default_factory=_cache_hits)
    steps: int = 0
    recompiles: int = 0
    _last_us: int = 0
    _frames_seen: int = 0

    def __call__(self, model: nn.Module, optimizer: Any) -> None:
        self.steps += 1
        if self.steps == 1:
            self._after_first_step()
        else:
            self._count_recompiles()

    # -- step 1 -----------------------------------------------------------------------
    def _after_first_step(self) -> None:
        compiles = _compiles_since(self.started_us)
        self._last_us = _now_us()
        self._frames_seen = _counter("frames", "total")
        details = self.record.details
        details["compile_seconds"] = round(sum(_seconds(m) for m in compiles), 3)
        details["frames_compiled"] = sum(1 for m in compiles if m.is_forward is not False)
        details["graphs"] = _counter("stats", "unique_graphs") - self.graphs_before
        details["graph_breaks"] = _graph_breaks() - self.breaks_before
        failed = [f"{m.co_name}: {m.fail_type}: {m.fail_reason}" for m in compiles
                  if m.fail_type]
        if failed:
            details["failed_compiles"] = failed
        details["recompiles_after_first_step"] = 0
        # torch's own caches (FX graph + AOTAutograd entries) in the first step's compiles
        details["torch_cache_hits"] = _cache_hits() - self.hits_before
        details["torch_cache_misses"] = _cache_misses() - self.misses_before
        self._check_ran_compiled(compiles)
        if self.cache is not None:
            self._store_cache()

    def _check_ran_compiled(self, compiles: list[Any]) -> None:
        failed = {(m.co_filename, m.co_firstlineno) for m in compiles if m.fail_type}
        states = {name: ran_compiled(module) and _forward_code(module) not in failed
                  if ran_compiled(module) is not None else None
                  for name, module in self.regions.items()}
        eager = [name or "<root>" for name, ok in states.items() if ok is False]
        uncalled = [name or "<root>" for name, ok in states.items() if ok is None]
        details = self.record.details
        details["ran_compiled"] = [name or "<root>" for name, ok in states.items() if ok]
        details["ran_eager"] = eager
        details["not_called"] = uncalled
        if eager or uncalled:
            parts = []
            if eager:
                parts.append(f"{len(eager)} of {len(states)} compiled region(s) ran EAGER code "
                             f"in the first step, not the compiled code: {', '.join(eager)} "
                             "(a suppressed compile error, torch.compiler.disable or a "
                             "force_eager stance; see rt.report['compile']"
                             ".details['failed_compiles'])")
            if uncalled:
                parts.append(f"{len(uncalled)} compiled region(s) were never called through "
                             f"module(...) in the first step, so never ran compiled code: "
                             f"{', '.join(uncalled)} (does a parent call .forward() directly?)")
            msg = "compile: " + "; ".join(parts)
            self.record.note(msg)
            if self.is_main:
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
            self.record.note(f"first step: all {len(states) - len(uncalled)} called region(s) "
                             f"ran compiled code ({self.record.details['graphs']} graph(s), "
                             f"{self.record.details['compile_seconds']:.2f} s compiling)")

    def _store_cache(self) -> None:
        target = self.cache
        assert target is not None
        details = self.record.details
        missed = _cache_misses() > self.misses_before
        if (target.loaded.hit and not missed) or not self.writes:
            details["cache_written"] = False
            return
        if self.backend != "inductor":  # torch's artifacts are process-wide: another
            # model's inductor compiles would be stored under this plan's key
            details["cache_written"] = False
            self.record.note(f"cache: the {self.backend!r} backend leaves no torch compile "
                             "artifacts to store (inductor does)")
            return
        size, problem = compile_cache.save_bundle(target.path, target.key,
                                                  self.started_us / 1e6 - 1.0)
        details["cache_written"] = size > 0
        details["cache_bytes"] = size
        if problem:
            self.record.note(problem)
            if self.is_main:
                log.warning("compile: %s", problem)
        elif size == 0:
            self.record.note("cache: torch recorded no compile artifacts to store")
        elif self.is_main:
            log.info("compile: cache written to %s (%d bytes)", target.path, size)

    # -- later steps --------------------------------------------------------------------
    def _count_recompiles(self) -> None:
        frames = _counter("frames", "total")  # one dict read a step while nothing compiles
        if frames == self._frames_seen:
            return
        self._frames_seen = frames
        compiles = _compiles_since(self._last_us)
        self._last_us = _now_us()
        new = [m for m in compiles if m.is_forward is not False]
        if not new:
            return
        self.recompiles += len(new)
        self.record.details["recompiles_after_first_step"] = self.recompiles
        for m in new:
            guard = guard_of(m.recompile_reason) if m.recompile_reason else \
                "a new frame (no guard failed: a graph break or a new code path)"
            entry = f"step {self.steps}: {m.co_name} ({m.compile_id}) recompiled: {guard}"
            self.record.details.setdefault("recompile_reasons", []).append(entry)
            if self.is_main:
                log.warning("compile: recompile after the first step, %s", entry)


def _forward_code(module: nn.Module) -> tuple[str, int]:
    code = inspect.unwrap(type(module).forward).__code__
    return code.co_filename, code.co_firstlineno


def _seconds(metrics: Any) -> float:
    if metrics.start_time_us and metrics.end_time_us:
        return (metrics.end_time_us - metrics.start_time_us) / 1e6
    return float(metrics.entire_frame_compile_time_s or 0.0)


__all__ = ["CompileWatch", "CacheTarget", "mark_compiled", "ran_compiled", "guard_of", "MARK"]
