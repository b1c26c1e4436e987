"""``rt.save`` / ``rt.load``: the whole training state through torch.distributed.checkpoint.

What is saved (``checkpoint_files.py`` describes the directory):

- model and optimizer via ``get_state_dict`` / ``set_state_dict``, so FSDP / TP DTensors are
  written as shards by every rank in parallel and resharded on load (saved on N ranks,
  loadable on M). Only tensors go through DCP; the non-tensor leaves of the optimizer state
  (param groups) go to ``state.pt`` with the scheduler, the grad scaler and the step counters.
- per rank (``rank-<r>.pt``): RNG states (python, numpy, torch CPU, the accelerator) and the
  position of every loader made by ``rt.shard``.

Loading on a different number of ranks (M ≠ N): rank ``r`` restores saved rank ``r``'s RNG
when ``r < N``; a rank beyond the saved ones seeds python/numpy/torch from
``crc32(saved rank 0's torch state, step, r)`` — deterministic and distinct per rank, but not
a continuation.

Loader positions: rank ``r`` hands what saved rank ``r % N``'s loaders returned from
``state_dict()`` back to ``load_state_dict()`` unchanged — the checkpoint assumes nothing
about its contents; a loader made by ``rt.shard`` stores a position that does not depend on
the world size and converts it itself. Loaders made before ``rt.load`` take theirs at once;
the rest wait in ``rt._pending_loader_states`` (a list of those dicts, in ``rt.shard`` call
order), which ``rt.shard`` consumes as it makes them.

``rt.optimizer`` may be a wrapper with ``.optimizer``: the raw optimizer is checkpointed.
With ``grad_accum > 1`` a checkpoint is taken between optimizer steps: ``save`` and ``load``
in the middle of an accumulation are refused (``_check_at_boundary`` says why).
With a DeepSpeed engine (the engine a pass handed on) the engine's own ``save_checkpoint`` /
``load_checkpoint`` write its files inside the same atomic directory; resharding follows
DeepSpeed's rules. ``checkpoint_deepspeed.py`` fsyncs them and makes DeepSpeed read them
with ``weights_only=True`` (and says what stays trusted).

Load checks, then restores (``load``): every rank reads and checks its share of the files
(crc32s on the I/O threads, ``_verified_prepare``) and records and all of its own small state, the ranks agree (``_agreed``: one rank's
refusal is raised on every rank), and only then does any rank restore. Tensors are not
staged in a second copy: each DCP record is checked on the meta device first (its pickle
and zip layout, no data read), so the read into the model's own storage that follows can
only fail on an I/O error. Save and load run as steps agreed on every rank the same way,
and every failure, DCP's ``CheckpointException`` (a BaseException) included, is raised as
a ``CheckpointError``; a failed save removes its temporary directory (``_discard``).

``async_=True``: tensors are staged to CPU memory (a copy kept for the next async save,
``_stager``), written by background threads at the lowest CPU priority
(``cf.ChecksumWriter(background=True)``), and the checkpoint is published (manifest, marker, rename) by the next ``save``/``load``,
``rt.wait_for_save()``, or at the latest when the interpreter exits (an ``atexit`` hook):
until then ``path`` does not exist yet.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
import random
import shutil
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                      set_model_state_dict,
                                                      set_optimizer_state_dict)

from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointCorrupt, CheckpointError, CheckpointMismatch, OverdriveError
from . import checkpoint_deepspeed as ds
from . import checkpoint_files as cf
from . import custom_state, model_meta
from . import checkpoint_pipeline as pipeline_ckpt
from .grad import raw_optimizer
from .ledger import collective

log = logging.getLogger("overdrive")

COUNTERS = ("step",)  # the runtime attributes a checkpoint restores: non-negative ints

# What a step of save/load may raise: DCP's CheckpointException is a BaseException.
_FAILURES = (Exception, CheckpointException)


def io_threads() -> int:
    """Threads per rank for checkpoint files: the cores this rank has to itself, 1 to 4.

    A save writes one DCP file per thread; a load checks and reads a rank's files on as
    many.

    Serialising, checksumming and fsyncing several files overlap (rt.save of a 110 MB
    model ~15% faster with two threads than one on 2 cores); more threads than cores per
    rank only make the ranks of a node fight over them.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, local_ranks)))


def _without_gc(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (as torch's own
    ``get_state_dict`` does): a save or load builds thousands of small objects (DCP plans,
    metadata, record parsers), which set off full collections of the whole heap — tens of
    ms each with torch and transformers loaded, most of the fixed cost of a load that was
    measured. Reference counting still frees everything; the collector resumes after, as
    it was (a paused collector stays paused)."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()
    return paused


# --------------------------------------------------------------------------- process group


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group(rt):
    """A gloo group of its own for checkpoint collectives (async saves run in a thread)."""
    if not dist.is_initialized():
        return None
    if getattr(rt, "_ckpt_group", None) is None:
        rt._ckpt_group = dist.new_group(backend="gloo")
        rt._ckpt_dcp_group = dist.new_group(backend="gloo")
    return rt._ckpt_group


def _dcp_group(rt):
    """DCP's own collectives use a second group: an async save's run in its background
    thread while the agreements of ``_agreed`` run on the first."""
    return None if _group(rt) is None else rt._ckpt_dcp_group


@contextlib.contextmanager
def _quiet(group):
    """A single process (no process group) saves/loads with ``no_dist``; DCP still warns."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(group) -> None:
    if group is not None:
        collective("barrier", dist.barrier, group=group)


def _broadcast(obj: Any, group) -> Any:
    if group is None:
        return obj
    box = [obj]
    collective("broadcast_object_list", dist.broadcast_object_list, box, src=0, group=group)
    return box[0]


def _all_gather(obj: Any, group) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    collective("all_gather_object", dist.all_gather_object, out, obj, group=group)
    return out


# --------------------------------------------------------------------------- state trees


def split(tree: Any) -> tuple[Any, Any]:
    """(tensor leaves, other leaves) of a nested dict, each keeping the nesting."""
    if isinstance(tree, dict):
        if not tree:
            return None, {}
        tensors, plain = {}, {}
        for k, v in tree.items():
            t, p = split(v)
            if t is not None:
                tensors[k] = t
            if p is not None:
                plain[k] = p
        return tensors or None, plain or None
    if isinstance(tree, torch.Tensor):
        return tree, None
    return None, tree


def merge(tensors: Any, plain: Any) -> Any:
    if tensors is None:
        return plain
    if plain is None:
        return tensors
    out = dict(plain)
    for k, v in tensors.items():
        out[k] = merge(v, plain.get(k))
    return out


def flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{"model.layers.0.w": shape}`` — DCP's flattened key convention."""
    out: dict[str, tuple[int, ...]] = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_shapes(v, key + "."))
        else:
            out[key] = tuple(v.shape)
    return out


def _app_state(rt) -> dict[str, Any]:
    opt = raw_optimizer(rt.optimizer)
    model_sd, optim_sd = get_state_dict(rt.model, [opt] if opt is not None else [],
                                        options=StateDictOptions(strict=True))
    app = {"model": model_sd}
    if opt is not None:
        app["optim"] = optim_sd
    return app


def _replicated_state(rt, plain_app: Any, custom: list) -> dict[str, Any]:
    return {
        "app": plain_app,
        "custom": custom,  # rt.register_for_checkpointing objects (custom_state.py)
        "scheduler": rt.scheduler.state_dict() if rt.scheduler is not None else None,
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "counters": {c: getattr(rt, c) for c in COUNTERS},
    }


def _rank_state(rt) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "device": None,
        # the loaders made so far, then the positions still waiting for rt.shard
        "loaders": [ld.state_dict() for ld in rt._loaders]
        + list(getattr(rt, "_pending_loader_states", [])),
    }
    dev = rt.device
    if dev.type not in ("cpu", "meta") and hasattr(torch, dev.type):
        state["device"] = {"type": dev.type,
                           "state": getattr(torch, dev.type).get_rng_state(dev).cpu()}
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved_dev = state.get("device")
    if saved_dev is not None and saved_dev["type"] == device.type:
        getattr(torch, device.type).set_rng_state(saved_dev["state"], device)


def _derive_rng(rank0_state: dict[str, Any], step: int, rank: int) -> None:
    seed = zlib.crc32(rank0_state["torch"].numpy().tobytes() + f"/{step}/{rank}".encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the accelerators too


# --------------------------------------------------------------------------- save


@dataclass(eq=False)
class PendingSave:
    future: Any
    tmp: Path
    path: Path
    keep_last: int | None
    meta: dict[str, Any]
    group: Any
    rank: int
    world: int
    written: dict[str, dict[str, int]]  # manifest entries of the files this rank wrote
    writer: Any = None  # DCP's ChecksumWriter: the entries of its files once written
    lock: cf.SaveLock | None = None  # rank 0: held on tmp until published or discarded


# Async saves not published yet. Held here, not through their runtime, so a save started
# right before the process ends (or whose runtime was dropped) is still published at exit.
_UNPUBLISHED: set[PendingSave] = set()


@_without_gc
def save(rt, path: str | Path, *, keep_last: int | None = None, async_: bool = False) -> None:
    """Write the whole training state to ``path`` atomically (every rank calls this)."""
    wait_for_save(rt)
    path = Path(path).absolute()
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} is not valid; use an integer >= 1 or None")
    _check_at_boundary(rt, "rt.save")
    custom = custom_state.collect(rt._custom_objects)  # every rank (may be a collective)
    if keep_last is not None and cf.series(path.name) is None:
        raise ValueError(f"keep_last={keep_last} keeps the newest checkpoints named like "
                         f"{path.name!r} with another number, and {path.name!r} has no number; "
                         "name checkpoints like 'step-100' or pass keep_last=None")
    group = _group(rt)
    rank, world = _world()
    token = _broadcast(uuid.uuid4().hex[:12] if rank == 0 else None, group)
    tmp = cf.tmp_sibling(path, token)
    lock = _agreed(lambda: _start(path, tmp) if rank == 0 else None, group, CheckpointError,
                   f"the save of {path}")
    meta = {"format": cf.FORMAT, "kind": "dcp", "step": getattr(rt, "step", 0),
            "world_size": world, "time_ns": time.time_ns(),
            "plan": rt.plan.to_dict() if rt.plan is not None else None,
            "model": type(rt.model).__name__,
            # the data layout, for an elastic resume's log line (load on other data ranks)
            "data": {"dp_size": rt.dp_size, "grad_accum": rt.grad_accum,
                     "global_batch_size": rt.plan.global_batch_size},
            "export": model_meta.describe(rt)}  # for `overdrive export` (model_meta.py)
    pending = PendingSave(None, tmp, path, keep_last, meta, group, rank, world, {}, lock=lock)
    try:
        # every rank's own files first, agreed: no rank enters DCP's collectives alone
        tensors = _agreed(lambda: _write_plain(rt, pending, custom), group, CheckpointError,
                          f"the save of {path}")
        _agreed(lambda: _write_tensors(rt, pending, tensors, async_), group, CheckpointError,
                f"the save of {path}")
    except CheckpointError:
        _discard(pending)
        raise
    if async_:
        rt._pending_save = pending
        _UNPUBLISHED.add(pending)
        _register_exit_hook()
    else:
        _finish(pending)


def _remove_tree(tmp: Path, patience_s: float = 30.0) -> None:
    """Remove ``tmp``, again while files keep appearing: when one of DCP's writer threads
    fails, the others are not joined and finish their files after the error was raised."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(tmp) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _start(path: Path, tmp: Path) -> cf.SaveLock:
    """Rank 0: remove what failed or crashed saves of the series left, make ``tmp``."""
    cf.remove_stale_tmp(path)
    return cf.make_tmp(tmp)


def _write_plain(rt, p: PendingSave, custom: list) -> Any:
    """This rank's ``rank-<r>.pt`` (and rank 0's ``state.pt``); returns the tensors DCP
    writes next (None for a DeepSpeed engine, which writes its own)."""
    p.written[f"rank-{p.rank}.pt"] = cf.save_plain(_rank_state(rt), p.tmp / f"rank-{p.rank}.pt")
    if rt._engine is not None:
        p.meta["kind"] = "deepspeed"
        plain = tensors = None
    else:
        tensors, plain = split(_app_state(rt))
        if getattr(rt, "_pipeline", None) is not None:  # each pp rank's optimizer knows its stages only
            plain = pipeline_ckpt.merged_param_groups(plain, _all_gather(plain, p.group),
                                                      rt._pipeline.param_order)
    if p.rank == 0:
        p.written["state.pt"] = cf.save_plain(_replicated_state(rt, plain, custom),
                                              p.tmp / "state.pt")
    return tensors


def _write_tensors(rt, p: PendingSave, tensors: Any, async_: bool) -> None:
    engine = rt._engine
    if engine is not None:
        ds.save(engine, p.tmp)
        return
    p.writer = cf.ChecksumWriter(str(p.tmp), sync_files=True, thread_count=io_threads(),
                                 background=async_)
    group = _dcp_group(rt)
    with _quiet(group):
        if async_:
            p.future = dcp.async_save(tensors, storage_writer=p.writer, process_group=group,
                                      no_dist=group is None, async_stager=_stager(rt))
        else:
            dcp.save(tensors, storage_writer=p.writer, process_group=group,
                     no_dist=group is None)


def _stager(rt):
    """The CPU copy an async save is written from, kept for the next one: only the first
    async save allocates (and page-faults) it, later ones copy into it. The copy is taken
    before ``rt.save`` returns (nothing the loop changes afterwards reaches the files);
    pinned on a CUDA machine."""
    if getattr(rt, "_ckpt_stager", None) is None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        rt._ckpt_stager = DefaultStager(StagingOptions(
            use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
            use_async_staging=False, use_non_blocking_copy=False))
    return rt._ckpt_stager


def _discard(p: PendingSave) -> None:
    """A failed save: rank 0 removes its temporary directory (every rank has stopped
    writing into it: the failure was agreed on), then drops the lock."""
    if p.rank == 0:
        _remove_tree(p.tmp)
        log.warning("overdrive: the save of %s failed; removed its temporary directory %s",
                    p.path, p.tmp.name)
    if p.lock is not None:
        p.lock.release()


def _check_at_boundary(rt, what: str) -> None:
    """Checkpoints are taken between optimizer steps. Mid-accumulation, the gradients
    summed so far live where no checkpoint can take them (FSDP2 keeps them unsharded inside
    its parameters, DeepSpeed in its buckets, DDP unsynced per rank), so a save there could
    not resume exactly and a load there would mix two runs: both are refused."""
    sync = getattr(rt, "_grad_sync", None)
    micro = getattr(sync, "micro", 0)
    if micro:
        raise CheckpointError(
            f"{what} at micro-step {micro} of grad_accum={sync.n}: gradients accumulated "
            "since the last optimizer step are not part of a checkpoint. Call it between "
            "steps, e.g. `if rt.sync_gradients and rt.step % 100 == 0: rt.save(...)` after "
            "rt.optimizer.step()")


def wait_for_save(rt) -> None:
    """Finish a pending (async) save: wait for the writes, then publish it atomically."""
    pending: PendingSave | None = getattr(rt, "_pending_save", None)
    if pending is None:
        return
    rt._pending_save = None
    _finish(pending)


def _finish(p: PendingSave) -> None:
    _UNPUBLISHED.discard(p)
    try:
        _agreed(lambda: _wait_for_writes(p), p.group, CheckpointError, f"the save of {p.path}")
        _publish(p, p.group, p.rank, p.world)
    except CheckpointError:
        _discard(p)
        raise


def _wait_for_writes(p: PendingSave) -> None:
    if p.future is not None:
        result = getattr(p.future, "upload_completion", p.future)
        result.result()


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_publish_at_exit)
        _exit_hook_registered = True


def _publish_at_exit() -> None:
    """An async save nobody waited for is published when the interpreter exits (every rank
    runs this, as every rank would have called ``wait_for_save``)."""
    for p in list(_UNPUBLISHED):
        try:
            if p.world == 1 or dist.is_initialized():
                _finish(p)
                continue
            # The process group is gone (destroyed before exit): no collective is possible.
            # Rank 0's DCP save completes only after every rank's write results reached it,
            # so once its writes are done every file is on disk and it publishes alone.
            _UNPUBLISHED.discard(p)
            try:
                _wait_for_writes(p)
                if p.rank == 0:
                    _publish(p, None, 0, 1)
            except _FAILURES as e:
                _discard(p)
                raise as_checkpoint_error(e, CheckpointError) from None
        except Exception:  # at exit, say what was lost rather than a traceback
            log.exception("overdrive: the async save of %s could not be finished at exit; "
                          "it was not published", p.path)


def _publish(p: PendingSave, group, rank: int, world: int) -> None:
    """Every rank's files are written and fsynced (the DCP writer syncs its files): the
    manifest takes the entries computed while writing, and reads only the files written by
    others (DeepSpeed's; another rank's, when rank 0 publishes alone), split over ranks."""
    _barrier(group)
    mine = {**p.written, **(p.writer.written if p.writer is not None else {})}
    known = {k: v for part in _all_gather(mine, group) for k, v in part.items()}
    files = cf.data_files(p.tmp) if rank == 0 else None
    files = _broadcast(files, group)
    unknown = [f for f in files if f not in known]
    what = f"the save of {p.path}"
    described = _agreed(lambda: cf.describe_files(p.tmp, unknown[rank::world]), group,
                        CheckpointError, what)
    known.update({k: v for part in _all_gather(described, group) for k, v in part.items()})
    _agreed(lambda: _put_in_place(p, {f: known[f] for f in files}) if rank == 0 else None,
            group, CheckpointError, what)


def _put_in_place(p: PendingSave, entries: dict[str, dict[str, int]]) -> None:
    """Rank 0: manifest, marker, rename to ``path``, prune the series."""
    cf.check_sizes(p.tmp, entries)
    cf.write_file(p.tmp / cf.MANIFEST, _json({"version": cf.MANIFEST_VERSION, "files": entries}))
    cf.write_marker(p.tmp, p.meta)
    cf.publish(p.tmp, p.path)
    (p.path / cf.LOCK).unlink(missing_ok=True)
    if p.lock is not None:
        p.lock.release()
    if p.keep_last is not None:
        removed = cf.prune(p.path, p.keep_last)
        if removed:
            log.info("overdrive: removed old checkpoint(s) %s", ", ".join(map(str, removed)))
    log.info("overdrive: saved checkpoint %s (step %s)", p.path, p.meta["step"])


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=1, sort_keys=True).encode()


# --------------------------------------------------------------------------- load


@_without_gc
def load(rt, path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the checkpoint's marker (step, plan…).

    Everything is read and checked on every rank before anything is restored: the files
    (manifest sizes and crc32), every DCP record (unpickled on the meta device: a tensor of
    the saved shape and dtype), keys and shapes, RNG states, counters, scheduler / scaler /
    loader states. Only when every rank found its part good does any rank restore, and a
    failure on one rank is raised on every rank: a refused load leaves the runtime as it was.
    """
    wait_for_save(rt)
    group = _group(rt)
    rank, world = _world()
    path, meta, manifest = _agreed(lambda: _open(Path(path).absolute(), rank), group)
    todo = _verified_prepare(rt, path, meta, manifest, group, verify)
    _agreed(lambda: _restore(rt, todo, meta, rank, group), group,
            what="the load while restoring, after every check passed (this runtime may be "
                 "partly restored; load a checkpoint again before training)")
    if rank == 0:
        log.info("overdrive: loaded checkpoint %s (step %s, saved on %s rank(s), loaded on %s)",
                 path, meta["step"], meta["world_size"], world)
    _note_elastic(rt, meta)
    return meta


def _note_elastic(rt, meta: dict[str, Any]) -> None:
    """A checkpoint saved on another number of data ranks: the loaders continue with the
    same global batches (their positions are global); say so, with the grad_accum each
    layout runs (logged by rt.shard when grad_accum is derived there, after this)."""
    data = meta.get("data")
    if not isinstance(data, dict):
        return  # saved before the layout was recorded
    saved_dp, saved_ga = data.get("dp_size"), data.get("grad_accum")
    if not (isinstance(saved_dp, int) and isinstance(saved_ga, int)) or saved_dp == rt.dp_size:
        return
    saved_gbs = data.get("global_batch_size")
    if rt.is_main and saved_gbs != rt.plan.global_batch_size:
        log.warning("overdrive: the checkpoint was saved with global_batch_size=%s and this "
                    "plan has %s: the steps after the resume hold other samples than the "
                    "saved run's would", saved_gbs, rt.plan.global_batch_size)
    rt._elastic_note = (saved_dp, saved_ga, int(meta["step"]))
    rt._log_elastic()


def _open(path: Path, rank: int) -> tuple[Path, dict[str, Any], dict[str, dict[str, int]]]:
    path = _existing(path, rank)
    return path, cf.read_marker(path), cf.read_manifest(path)


def _restore(rt, todo: "_Load", meta: dict[str, Any], rank: int, group) -> None:
    """Everything was checked on every rank: now the runtime is changed. Only an I/O error
    or a file changed meanwhile can still fail here."""
    try:
        if todo.engine is not None:
            ds.load(todo.engine, todo.path)
        else:
            _load_dcp(rt, todo, group)
        _restore_replicated(rt, todo)
        custom_state.restore(rt._custom_objects, todo.replicated.get("custom"))
        _restore_rank(rt, todo, meta, rank)
    except _FAILURES as e:
        error = as_checkpoint_error(e, CheckpointCorrupt)
        raise type(error)(f"{error} (while restoring {todo.path}, after every check passed: "
                          "this runtime may be partly restored; load a checkpoint again "
                          "before training)") from e


def _existing(path: Path, rank: int) -> Path:
    aside = cf.set_aside(path)
    if aside is None:
        return path
    if rank == 0:
        log.warning("overdrive: %s is missing: a save replacing it was interrupted; loading "
                    "the previous checkpoint it set aside, %s (the next save of %s puts it "
                    "back)", path, aside.name, path.name)
    return aside


@dataclass
class _Load:
    """What ``load`` will restore, read and checked before anything is touched."""

    path: Path
    replicated: dict[str, Any]
    counters: dict[str, int]
    rank_state: dict[str, Any]
    own_rng: bool  # this rank's saved RNG (else derived: a rank beyond the saved ones)
    loaders: list[Any]
    engine: Any = None  # DeepSpeed
    reader: Any = None  # DCP
    tensors: Any = None
    plain: Any = None


def _agreed(step, group, kind: type[CheckpointError] = CheckpointCorrupt,
            what: str = "the load"):
    """``step()`` on every rank; when one rank refuses (or fails), every rank raises
    (none goes on alone into a collective the others never join): the failing rank its own
    error as a ``CheckpointError`` (``kind`` for one that is not), the others the first
    refusal, naming the rank."""
    result, error, refusal = None, None, None
    try:
        result = step()
    except _FAILURES as e:  # re-raised below, after the others know
        error = as_checkpoint_error(e, kind)
        refusal = (_world()[0], type(error), str(error))
    refusals = [r for r in _all_gather(refusal, group) if r is not None]
    if error is not None:
        raise error
    if refusals:
        rank, kind, message = refusals[0]
        raise kind(f"rank {rank} refused {what}: {message}")
    return result


def _unwrap(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's ``CheckpointException``."""
    if isinstance(e, CheckpointException) and e.failures:
        first = e.failures[min(e.failures)]
        return _unwrap(first[0] if isinstance(first, tuple) else first)
    return e


def as_checkpoint_error(e: BaseException, kind: type[CheckpointError]) -> CheckpointError:
    """``e`` as a CheckpointError: itself when it is one, else ``kind`` naming it."""
    inner = _unwrap(e)
    if isinstance(inner, CheckpointError):
        return inner
    out = kind(f"{type(inner).__name__}: {inner}")
    out.__cause__ = inner
    return out


def _prepare(rt, path: Path, meta: dict[str, Any], manifest: dict[str, dict[str, int]],
             rank: int, world: int) -> _Load:
    _check_at_boundary(rt, "rt.load")
    saved_world = meta["world_size"]
    own_rng = rank < saved_world
    rng_file, loader_file = f"rank-{rank if own_rng else 0}.pt", f"rank-{rank % saved_world}.pt"
    _check_listed(path, manifest, ["state.pt", rng_file, loader_file]
                  + ([".metadata"] if meta["kind"] != "deepspeed" else []))
    replicated = _check_fields(cf.load_plain(path, "state.pt", manifest), path / "state.pt",
                               {"app": (dict, type(None)), "scheduler": (dict, type(None)),
                                "scaler": (dict, type(None)), "counters": (dict,)})
    rank_state = _check_fields(cf.load_plain(path, rng_file, manifest), path / rng_file,
                               {"python": (list, tuple), "numpy": (list, tuple),
                                "torch": (torch.Tensor,), "device": (dict, type(None)),
                                "loaders": (list,)})
    loaders = rank_state["loaders"] if loader_file == rng_file else _check_fields(
        cf.load_plain(path, loader_file, manifest), path / loader_file,
        {"loaders": (list,)})["loaders"]
    _check_rng(rank_state, rt.device, path / rng_file)
    counters = _check_counters(replicated["counters"], path / "state.pt")
    _check_replicated(rt, replicated)
    _check_loaders(rt, loaders, path / loader_file)
    custom_state.check(rt._custom_objects, replicated.get("custom"), path)
    todo = _Load(path, replicated, counters, rank_state, own_rng, loaders)
    if meta["kind"] == "deepspeed":
        todo.engine = rt._engine
        ds.check_loadable(todo.engine, path, manifest)
        return todo
    todo.reader = cf.SafeReader(str(path), manifest, threads=io_threads())
    metadata = todo.reader.read_metadata()
    saved = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if hasattr(v, "size")}
    todo.tensors, current = split(_app_state(rt))
    staged = getattr(rt, "_pipeline", None) is not None  # this rank holds some stages: a subset of the keys
    _check_keys(flat_shapes(todo.tensors), saved, path, subset=staged)
    todo.plain = replicated["app"]
    if staged:
        todo.plain = pipeline_ckpt.own_param_groups(todo.plain, current)
    _check_param_groups(current, todo.plain, path)
    # every record is checked by one rank (the ranks split them), before any is read
    todo.reader.layouts = cf.check_records(path, metadata,
                                           cf.record_order(metadata.storage_data)[rank::world])
    return todo


def _check_fields(state: Any, where: Path, fields: dict[str, tuple[type, ...]]) -> dict:
    """A ``.pt`` state of the checkpoint is a dict whose ``fields`` have the given types."""
    if not isinstance(state, dict):
        raise CheckpointCorrupt(f"{where} holds a {type(state).__name__}, not the dict "
                                "rt.save writes; the file was altered or not written by "
                                "overdrive")
    for name, types in fields.items():
        if not isinstance(state.get(name), types):
            raise CheckpointCorrupt(
                f"{where}: {name!r} is a {type(state.get(name)).__name__}, expected "
                f"{' or '.join(t.__name__ for t in types)}; the file was altered or not "
                "written by overdrive")
    return state


def _check_counters(counters: dict[str, Any], where: Path) -> dict[str, int]:
    """Only the runtime's known counters, each a non-negative int."""
    unknown = sorted(map(str, set(counters) - set(COUNTERS)))
    if unknown:
        raise CheckpointCorrupt(f"{where}: counters {unknown} are not counters overdrive "
                                f"saves (it saves {list(COUNTERS)}); the file was altered")
    for name in COUNTERS:
        v = counters.get(name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise CheckpointCorrupt(f"{where}: counter {name}={v!r} is not an integer >= 0")
    return {c: counters[c] for c in COUNTERS}


def _check_rng(state: dict[str, Any], device: torch.device, where: Path) -> None:
    """The saved RNG states are applied to throwaway generators first: one that the real
    ones would refuse is refused here, before anything is restored."""
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        name, keys, *rest = state["numpy"]
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"numpy keys are a {type(keys).__name__}, not a tensor")
        np.random.RandomState().set_state((name, keys.numpy(), *rest))
        torch.Generator().set_state(state["torch"])
        dev = state.get("device")
        if dev is not None and dev.get("type") == device.type:
            have = getattr(torch, device.type).get_rng_state(device)
            saved = dev.get("state")
            if not (isinstance(saved, torch.Tensor) and saved.dtype == have.dtype
                    and saved.shape == have.shape):
                raise ValueError(f"the {device.type} RNG state is not a {have.dtype} tensor "
                                 f"of shape {list(have.shape)}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the generators refused
        raise CheckpointCorrupt(f"{where}: the saved RNG state is not valid "
                                f"({type(e).__name__}: {e}); the file was altered or not "
                                "written by overdrive") from None


def _verified_prepare(rt, path: Path, meta: dict[str, Any],
                      manifest: dict[str, dict[str, int]], group, crc: bool) -> _Load:
    """The files' check (sizes, and the crc32s on the I/O threads in the background; each
    rank checks its share of the files) and ``_prepare`` (keys, records, small states:
    mostly Python, on this thread) run at the same time. Damage found by any rank is raised
    first on every rank, whatever ``_prepare`` made of the damaged bytes; only then are
    ``_prepare``'s own refusals agreed on. Nothing is restored before both are done."""
    rank, world = _world()
    checking = cf.start_verify(path, manifest, sorted(manifest)[rank::world], crc,
                               io_threads())
    todo, refusal = None, None
    try:
        try:
            todo = _prepare(rt, path, meta, manifest, rank, world)
        except _FAILURES as e:  # raised below, once the files are known to be whole
            refusal = e
    finally:
        problems = checking.result()
    problems = [p for part in _all_gather(problems, group) for p in part]
    if problems:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: " + "; ".join(problems))

    def prepared() -> _Load:
        if refusal is not None:
            raise refusal
        return todo

    return _agreed(prepared, group)


def _load_dcp(rt, todo: _Load, group) -> None:
    with _quiet(group):
        dcp.load(todo.tensors, storage_reader=todo.reader, planner=cf.SafeLoadPlanner(),
                 process_group=_dcp_group(rt), no_dist=group is None)
    full = merge(todo.tensors, todo.plain)
    opt = raw_optimizer(rt.optimizer)
    options = StateDictOptions(strict=True)
    if opt is not None:
        set_optimizer_state_dict(rt.model, [opt], full["optim"], options=options)
    if not _loaded_in_place(rt.model, full["model"]):
        set_model_state_dict(rt.model, full["model"], options=options)


def _loaded_in_place(model, model_sd: dict[str, Any]) -> bool:
    """DCP loads into the tensors it is given; when ``get_state_dict`` handed out the
    model's own parameters and buffers (plain, DDP and FSDP2 models do), they already hold
    the checkpoint and a second copy through ``set_model_state_dict`` is skipped."""
    from torch.distributed.tensor import DTensor

    def ptr(t):
        return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()

    own = {ptr(t) for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    return all(ptr(t) in own for t in model_sd.values())


def _check_keys(expected: dict[str, tuple], saved: dict[str, tuple], path: Path, *,
                subset: bool = False) -> None:
    """``subset``: this rank holds some pipeline stages, so the checkpoint may hold more
    (the other stages') than it loads."""
    missing = sorted(set(expected) - set(saved))
    unexpected = [] if subset else sorted(set(saved) - set(expected))
    shapes = sorted(f"{k}: checkpoint {list(saved[k])}, model {list(expected[k])}"
                    for k in set(expected) & set(saved) if saved[k] != expected[k])
    if not (missing or unexpected or shapes):
        return
    parts = []
    for title, keys in (("missing from the checkpoint", missing),
                        ("unexpected in the checkpoint", unexpected), ("shape differs", shapes)):
        if keys:
            shown = ", ".join(keys[:20]) + (f" … (+{len(keys) - 20})" if len(keys) > 20 else "")
            parts.append(f"{title} ({len(keys)}): {shown}")
    raise CheckpointMismatch(
        f"checkpoint {path} does not fit this runtime's model/optimizer — " + "; ".join(parts)
        + ". It was saved from a different model or optimizer setup (keys are the model's "
        "parameter names; optim.* keys need the same optimizer type). To load weights only, "
        "use rt.export() and od.load_weights()")


def _check_param_groups(current: Any, saved_plain: Any, path: Path) -> None:
    """The optimizer's parameter groups (by parameter name) are the checkpoint's; both
    arguments are the non-tensor halves of ``_app_state`` (now, and as saved)."""
    def groups(plain):
        return [list(g.get("params", [])) for g in ((plain or {}).get("optim") or {}).get(
            "param_groups", [])]

    saved, have = groups(saved_plain), groups(current)
    if saved != have:
        raise CheckpointMismatch(
            f"checkpoint {path}: the optimizer's parameter groups differ — checkpoint "
            f"{len(saved)} group(s) of {[len(g) for g in saved]} parameters, this runtime "
            f"{len(have)} group(s) of {[len(g) for g in have]}; build the optimizer with the "
            "same parameter groups")


def _check_listed(path: Path, manifest: dict[str, dict[str, int]], names: list[str]) -> None:
    """Only files the manifest lists (and so verified) are read."""
    unlisted = sorted({n for n in names if n not in manifest})
    if unlisted:
        raise CheckpointCorrupt(f"checkpoint {path}: {', '.join(unlisted)} not listed in "
                                f"{cf.MANIFEST}; the checkpoint is incomplete or was altered")


def _check_replicated(rt, state: dict[str, Any]) -> None:
    for name, obj in (("scheduler", rt.scheduler), ("scaler", rt.scaler)):
        saved = state.get(name)
        if (saved is None) != (obj is None):
            have = "has" if obj is not None else "has no"
            raise CheckpointMismatch(
                f"the checkpoint {'has no' if saved is None else 'has a'} {name} state but this "
                f"runtime {have} {name}; build the runtime with the same {name} setup")
        if obj is None or saved == {}:  # a disabled GradScaler saves {}
            continue
        # a scheduler's load_state_dict is __dict__.update: no keys its own state lacks;
        # GradScaler's reads each of its keys
        want = set(obj.state_dict())
        if not isinstance(saved, dict) or not (
                set(saved) <= want if name == "scheduler" else set(saved) == want):
            got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointMismatch(
                f"the checkpoint's {name} state has keys {got}, this runtime's "
                f"{type(obj).__name__} {sorted(want)}; build the runtime with the same {name}")


def _check_loaders(rt, loaders: list[Any], where: Path) -> None:
    if len(rt._loaders) > len(loaders):
        raise CheckpointMismatch(
            f"the checkpoint holds {len(loaders)} data-loader position(s), this runtime has "
            f"{len(rt._loaders)} loader(s) made by rt.shard; shard the same loaders, in the same "
            "order (before or after rt.load)")
    for i, (ld, state) in enumerate(zip(rt._loaders, loaders)):
        check = getattr(ld, "check_state_dict", None)
        if check is None:
            continue
        try:
            check(state)
        except OverdriveError as e:
            raise CheckpointMismatch(f"loader {i}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a malformed position
            raise CheckpointCorrupt(f"{where}: the position of loader {i} is not valid "
                                    f"({type(e).__name__}: {e})") from None


def _restore_replicated(rt, todo: _Load) -> None:
    state = todo.replicated
    for obj, saved in ((rt.scheduler, state.get("scheduler")), (rt.scaler, state.get("scaler"))):
        if obj is not None and saved != {}:  # a disabled GradScaler saves {}
            obj.load_state_dict(saved)
    for c, v in todo.counters.items():  # checked: only COUNTERS, ints
        setattr(rt, c, v)


def _restore_rank(rt, todo: _Load, meta: dict[str, Any], rank: int) -> None:
    """RNG, and the loader positions: the loaders rt.shard made so far take theirs now,
    the rest wait in ``rt._pending_loader_states`` for the next rt.shard calls, in order
    (each state is whatever that loader's ``state_dict()`` returned: it converts its own
    position)."""
    if todo.own_rng:
        _restore_rng(todo.rank_state, rt.device)
    else:
        _derive_rng(todo.rank_state, meta["step"], rank)
    for ld, state in zip(rt._loaders, todo.loaders):
        ld.load_state_dict(state)
    rt._pending_loader_states = list(todo.loaders[len(rt._loaders):])
