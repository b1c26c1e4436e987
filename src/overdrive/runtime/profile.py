"""``rt.profile``: torch.profiler over a few optimizer steps.

The profiler's schedule (``wait`` skipped steps, ``warmup`` traced-but-dropped steps,
``active`` recorded steps, once) advances with ``rt.optimizer.step()``, so the recorded
window is whole optimizer steps, accumulation micro-steps included. When the window is
done the profiler stops and unhooks itself: the rest of the run pays nothing, and ranks
not in ``ranks`` never start one. Each profiled rank writes to ``out_dir``:

- ``trace_rank{R}.json``: a Chrome trace (chrome://tracing, https://ui.perfetto.dev);
- ``top_ops_rank{R}.txt``: the ops that took the most time over the active steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import OverdriveError

log = logging.getLogger("overdrive")


class StepProfiler:
    """What ``rt.profile`` returns; also a context manager that stops it early on exit."""

    def __init__(self, rt, prof, out_dir: Path, total: int):
        self.rt, self._prof, self.out_dir, self._left = rt, prof, out_dir, total
        self.trace_path: Path | None = None
        self.table_path: Path | None = None

    @classmethod
    def start(cls, rt, out_dir, *, wait: int, warmup: int, active: int, ranks: Any,
              memory: bool) -> "StepProfiler":
        for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OverdriveError(f"rt.profile({name}={value!r}): give an integer >= {low} "
                                     "(a number of optimizer steps)")
        if rt._profiler is not None:
            raise OverdriveError("rt.profile: a profile is already running on this runtime; "
                                 "let it finish (or leave its with-block) first")
        ranks = tuple(ranks) if ranks is not None else tuple(range(rt.world_size))
        out_dir = Path(out_dir)
        if rt.rank not in ranks:
            return cls(rt, None, out_dir, 0)
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if rt.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        me = cls(rt, None, out_dir, wait + warmup + active)
        prof = profile(activities=activities,
                       schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                       on_trace_ready=me._write, record_shapes=memory,
                       profile_memory=memory, with_stack=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.start()
        me._prof = prof
        rt._profiler = me
        return me

    @property
    def active(self) -> bool:
        return self._prof is not None

    def step(self) -> None:
        """One optimizer step done (called by ``rt.optimizer.step``)."""
        self._prof.step()
        self._left -= 1
        if self._left <= 0:
            self.stop()

    def stop(self) -> None:
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self.rt._profiler is self:
            self.rt._profiler = None
        prof.stop()

    def _write(self, prof) -> None:
        rank = self.rt.rank
        self.trace_path = self.out_dir / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(self.trace_path))
        sort = "self_cuda_time_total" if self.rt.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=20)
        self.table_path = self.out_dir / f"top_ops_rank{rank}.txt"
        self.table_path.write_text(table + "\n", encoding="utf-8")
        log.info("overdrive: profile written to %s (%s)", self.trace_path, self.table_path.name)

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
