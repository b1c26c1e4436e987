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
With a DeepSpeed engine (``env.engine``) the engine's own ``save_checkpoint`` /
``load_checkpoint`` write its files inside the same atomic directory; resharding follows
DeepSpeed's rules. ``checkpoint_deepspeed.py`` fsyncs them and makes DeepSpeed read them
with ``weights_only=True`` (and says what stays trusted).

``async_=True``: tensors are staged to CPU memory, written by a background thread, and the
checkpoint is published (manifest, marker, rename) by the next ``save``/``load``,
``rt.wait_for_save()``, or at the latest when the interpreter exits (an ``atexit`` hook):
until then ``path`` does not exist yet.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
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

from ..errors import CheckpointCorrupt, CheckpointError, CheckpointMismatch
from . import checkpoint_deepspeed as ds
from . import checkpoint_files as cf
from . import custom_state, model_meta
from . import checkpoint_pipeline as pipeline_ckpt
from .grad import raw_optimizer

log = logging.getLogger("overdrive")

COUNTERS = ("step",)


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
    return rt._ckpt_group


@contextlib.contextmanager
def _quiet(group):
    """A single process (no process group) saves/loads with ``no_dist``; DCP still warns."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


def _broadcast(obj: Any, group) -> Any:
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _all_gather(obj: Any, group) -> list[Any]:
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
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


# Async saves not published yet. Held here, not through their runtime, so a save started
# right before the process ends (or whose runtime was dropped) is still published at exit.
_UNPUBLISHED: set[PendingSave] = set()


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
    if rank == 0:
        cf.remove_stale_tmp(path)
        tmp.mkdir(parents=True)
    _barrier(group)

    meta = {"format": cf.FORMAT, "kind": "dcp", "step": getattr(rt, "step", 0),
            "world_size": world, "time_ns": time.time_ns(),
            "plan": rt.plan.to_dict() if rt.plan is not None else None,
            "model": type(rt.model).__name__,
            "export": model_meta.describe(rt)}  # for `overdrive export` (model_meta.py)
    written = {f"rank-{rank}.pt": cf.save_plain(_rank_state(rt), tmp / f"rank-{rank}.pt")}
    engine = getattr(rt.env, "engine", None)
    writer = future = None
    if engine is not None:
        meta["kind"] = "deepspeed"
        ds.save(engine, tmp)
        if rank == 0:
            written["state.pt"] = cf.save_plain(_replicated_state(rt, None, custom),
                                                tmp / "state.pt")
    else:
        tensors, plain = split(_app_state(rt))
        if getattr(rt, "_pipeline", None) is not None:  # each pp rank's optimizer knows its stages only
            plain = pipeline_ckpt.merged_param_groups(plain, _all_gather(plain, group),
                                                      rt._pipeline.param_order)
        if rank == 0:
            written["state.pt"] = cf.save_plain(_replicated_state(rt, plain, custom),
                                                tmp / "state.pt")
        cf.test_hook("write")
        writer = cf.ChecksumWriter(str(tmp), sync_files=True, thread_count=io_threads())
        if async_:
            with _quiet(group):
                future = dcp.async_save(tensors, storage_writer=writer, process_group=group,
                                        no_dist=group is None)
        else:
            with _quiet(group):
                dcp.save(tensors, storage_writer=writer, process_group=group,
                         no_dist=group is None)
    pending = PendingSave(future, tmp, path, keep_last, meta, group, rank, world, written,
                          writer)
    if async_:
        rt._pending_save = pending
        _UNPUBLISHED.add(pending)
        _register_exit_hook()
    else:
        _finish(pending)


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
    _wait_for_writes(p)
    _publish(p, p.group, p.rank, p.world)


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
            _wait_for_writes(p)
            if p.rank == 0:
                _publish(p, None, 0, 1)
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
    described = cf.describe_files(p.tmp, unknown[rank::world])
    known.update({k: v for part in _all_gather(described, group) for k, v in part.items()})
    if rank == 0:
        entries = {f: known[f] for f in files}
        cf.check_sizes(p.tmp, entries)
        cf.write_file(p.tmp / cf.MANIFEST, _json({"files": entries}))
        cf.write_marker(p.tmp, p.meta)
        cf.test_hook("rename")
        cf.publish(p.tmp, p.path)
        if p.keep_last is not None:
            removed = cf.prune(p.path, p.keep_last)
            if removed:
                log.info("overdrive: removed old checkpoint(s) %s", ", ".join(map(str, removed)))
        log.info("overdrive: saved checkpoint %s (step %s)", p.path, p.meta["step"])
    _barrier(group)


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=1, sort_keys=True).encode()


# --------------------------------------------------------------------------- load


def load(rt, path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the checkpoint's marker (step, plan…).

    Everything that can refuse the checkpoint (files, keys and shapes, scheduler / scaler /
    loader setup) is checked on every rank before anything is restored: a refused load
    leaves the runtime as it was.
    """
    wait_for_save(rt)
    group = _group(rt)
    rank, world = _world()
    path = _existing(Path(path).absolute(), rank)
    meta = cf.read_marker(path)
    manifest = _verify(path, group, verify)
    todo = _agreed(lambda: _prepare(rt, path, meta, manifest, rank), group)
    if todo.engine is not None:
        ds.load(todo.engine, path)
    else:
        _load_dcp(rt, todo, group)
    _restore_replicated(rt, todo.replicated)
    custom_state.restore(rt._custom_objects, todo.replicated.get("custom"))
    _restore_rank(rt, todo, meta, rank)
    _barrier(group)
    if rank == 0:
        log.info("overdrive: loaded checkpoint %s (step %s, saved on %s rank(s), loaded on %s)",
                 path, meta["step"], meta["world_size"], world)
    return meta


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

    replicated: dict[str, Any]
    rank_state: dict[str, Any]
    own_rng: bool  # this rank's saved RNG (else derived: a rank beyond the saved ones)
    loaders: list[Any]
    engine: Any = None  # DeepSpeed
    reader: Any = None  # DCP
    tensors: Any = None
    plain: Any = None


def _agreed(prepare, group) -> _Load:
    """``prepare()`` on every rank; when one rank refuses (or fails), every rank raises
    (none goes on alone into a collective the others never join): the failing rank its own
    error, the others the first refusal, naming the rank."""
    todo, error, refusal = None, None, None
    try:
        todo = prepare()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
        error = e
        kind = type(e) if isinstance(e, CheckpointError) else CheckpointError
        refusal = (_world()[0], kind, f"{type(e).__name__}: {e}" if kind is not type(e)
                   else str(e))
    refusals = [r for r in _all_gather(refusal, group) if r is not None]
    if error is not None:
        raise error
    if refusals:
        rank, kind, message = refusals[0]
        raise kind(f"rank {rank} refused the load: {message}")
    return todo


def _prepare(rt, path: Path, meta: dict[str, Any], manifest: dict[str, dict[str, int]],
             rank: int) -> _Load:
    _check_at_boundary(rt, "rt.load")
    saved_world = int(meta["world_size"])
    own_rng = rank < saved_world
    _check_listed(path, manifest, ["state.pt", f"rank-{rank if own_rng else 0}.pt",
                                   f"rank-{rank % saved_world}.pt"]
                  + ([".metadata"] if meta["kind"] != "deepspeed" else []))
    replicated = cf.load_plain(path / "state.pt")
    rank_state = cf.load_plain(path / f"rank-{rank if own_rng else 0}.pt")
    loaders = rank_state["loaders"] if own_rng else \
        cf.load_plain(path / f"rank-{rank % saved_world}.pt")["loaders"]
    _check_replicated(rt, replicated)
    _check_loaders(rt, loaders)
    custom_state.check(rt._custom_objects, replicated.get("custom"), path)
    todo = _Load(replicated, rank_state, own_rng, loaders)
    if meta["kind"] == "deepspeed":
        todo.engine = getattr(rt.env, "engine", None)
        ds.check_loadable(todo.engine, path, manifest)
        return todo
    todo.reader = cf.SafeReader(str(path), manifest, threads=io_threads())
    saved = {k: tuple(v.size) for k, v in todo.reader.read_metadata().state_dict_metadata.items()
             if hasattr(v, "size")}
    todo.tensors, current = split(_app_state(rt))
    staged = getattr(rt, "_pipeline", None) is not None  # this rank holds some stages: a subset of the keys
    _check_keys(flat_shapes(todo.tensors), saved, path, subset=staged)
    todo.plain = replicated["app"]
    if staged:
        todo.plain = pipeline_ckpt.own_param_groups(todo.plain, current)
    _check_param_groups(current, todo.plain, path)
    return todo


def _verify(path: Path, group, crc: bool) -> dict[str, dict[str, int]]:
    rank, world = _world()
    manifest = cf.read_manifest(path)
    names = sorted(manifest)
    problems = cf.verify_files(path, manifest, names[rank::world], crc, io_threads())
    problems = [p for part in _all_gather(problems, group) for p in part]
    if problems:
        raise CheckpointCorrupt(f"checkpoint {path} is damaged: " + "; ".join(problems))
    return manifest


def _load_dcp(rt, todo: _Load, group) -> None:
    with _quiet(group):
        dcp.load(todo.tensors, storage_reader=todo.reader, planner=cf.SafeLoadPlanner(),
                 process_group=group, no_dist=group is None)
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


def _check_loaders(rt, loaders: list[Any]) -> None:
    if len(rt._loaders) > len(loaders):
        raise CheckpointMismatch(
            f"the checkpoint holds {len(loaders)} data-loader position(s), this runtime has "
            f"{len(rt._loaders)} loader(s) made by rt.shard; shard the same loaders, in the same "
            "order (before or after rt.load)")


def _restore_replicated(rt, state: dict[str, Any]) -> None:
    for obj, saved in ((rt.scheduler, state.get("scheduler")), (rt.scaler, state.get("scaler"))):
        if obj is not None and saved != {}:  # a disabled GradScaler saves {}
            obj.load_state_dict(saved)
    for c, v in state.get("counters", {}).items():
        setattr(rt, c, v)


def _restore_rank(rt, todo: _Load, meta: dict[str, Any], rank: int) -> None:
    """RNG, and the loader positions: the loaders rt.shard made so far take theirs now,
    the rest wait in ``rt._pending_loader_states`` for the next rt.shard calls, in order
    (each state is whatever that loader's ``state_dict()`` returned: it converts its own
    position)."""
    if todo.own_rng:
        _restore_rng(todo.rank_state, rt.device)
    else:
        _derive_rng(todo.rank_state, int(meta["step"]), rank)
    for ld, state in zip(rt._loaders, todo.loaders):
        ld.load_state_dict(state)
    rt._pending_loader_states = list(todo.loaders[len(rt._loaders):])
