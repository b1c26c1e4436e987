"""Process helpers: main_process_first, progress bars and logging on rank 0, batch-size
search on OOM, and failure handling that names the failing rank and never hangs."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import sys
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .collectives import comm_device

log = logging.getLogger("overdrive")


@contextlib.contextmanager
def main_process_first(rt):
    """Rank 0 runs the block first (downloads, preprocessing); the others then follow.
    Their wait is as long as rank 0's block takes: the ledger never calls it a stall."""
    if not rt.is_main:
        with rt._collective("rt.main_process_first"):
            rt.barrier()
    try:
        yield
    finally:
        if rt.is_main:
            with rt._collective("rt.main_process_first"):
                rt.barrier()


def progress(rt, iterable: Iterable, **tqdm_kwargs: Any) -> Iterable:
    """A tqdm bar on rank 0; the plain iterable on the other ranks."""
    if not rt.is_main or tqdm_kwargs.get("disable") is True:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **tqdm_kwargs)


# --------------------------------------------------------------------------- logging


class RankFilter(logging.Filter):
    """Ranks other than 0 only log errors (a failing rank names itself); warnings, like
    info, come from rank 0 alone. OVERDRIVE_LOG_ALL_RANKS=1: every rank logs."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR


def configure_logging(rank: int) -> None:
    """Set up the "overdrive" logger once: rank-0 only, a handler if nobody configured one."""
    for f in list(log.filters):
        if isinstance(f, RankFilter):
            log.removeFilter(f)
    if os.environ.get("OVERDRIVE_LOG_ALL_RANKS") != "1":
        log.addFilter(RankFilter(rank))
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[overdrive rank {rank}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


# --------------------------------------------------------------------------- failures

_previous_hook = None


def install_failure_hook(rank: int) -> None:
    """On an uncaught exception: print it, log "rank N failed", abort the process group
    and exit non-zero at once — the launcher then stops the other ranks; ranks blocked in
    a collective elsewhere time out after OVERDRIVE_PG_TIMEOUT and exit too."""
    global _previous_hook
    if _previous_hook is not None:
        return
    _previous_hook = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            _previous_hook(exc_type, exc, tb)
            if not issubclass(exc_type, KeyboardInterrupt):
                msg = f"overdrive: rank {rank} failed: {exc_type.__name__}: {exc}"
                if log.hasHandlers() and log.isEnabledFor(logging.ERROR):
                    log.error(msg)
                else:
                    print(msg, file=sys.stderr)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            _abort_process_group()
            os._exit(1)

    sys.excepthook = hook


def _abort_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None:
            abort()
    except Exception:  # noqa: BLE001 — best effort on the way out
        pass


# --------------------------------------------------------------------------- batch size

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cudnn_status_not_supported",
                 "cublas_status_alloc_failed")


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MESSAGES)


def find_executable_batch_size(function: Callable | None = None, starting_batch_size: int = 128):
    """Call ``function(batch_size, ...)``, retrying with ×0.9 the batch size on OOM.

        @od.find_executable_batch_size(starting_batch_size=64)
        def train(batch_size): ...
        train()

    Under a process group the ranks agree after every attempt (one all-reduce of an
    out-of-memory flag): if any rank ran out of memory, every rank retries with the same
    smaller batch size, so no two ranks train with different ones. A rank that runs out
    while the others wait for it in a collective inside ``function`` still stalls them
    until the process-group timeout (OVERDRIVE_PG_TIMEOUT).
    """
    if function is None:
        return functools.partial(find_executable_batch_size,
                                 starting_batch_size=starting_batch_size)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        batch_size = starting_batch_size
        while True:
            if batch_size <= 0:
                raise RuntimeError(
                    f"find_executable_batch_size: no batch size fits in memory (started at "
                    f"{starting_batch_size}, reduced by 0.9 down to zero)")
            result, oom = None, False
            try:
                result = function(batch_size, *args, **kwargs)
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                oom = True
            if not _any_rank(oom):
                return result
            log.warning("overdrive: batch size %d ran out of memory%s; trying %d", batch_size,
                        "" if oom else " on another rank", int(batch_size * 0.9))
            batch_size = int(batch_size * 0.9)
            result = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return wrapper


def _any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the ranks of the default process group (itself alone: as is)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
