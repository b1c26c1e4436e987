"""``od.launch(fn, *args, nproc=2)``: run ``fn`` on ``nproc`` local processes, from a
script or a notebook, and return rank 0's result.

Each worker gets the torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` on a free local port), so ``od.accelerate`` inside ``fn``
starts the process group itself: gloo on CPU, nccl on CUDA (one GPU per rank).

How ``fn`` reaches the workers (fresh "spawn" processes, as CUDA needs):

- by reference (plain pickle) when it is importable: a function of a module, or of a
  script's ``__main__``;
- by value with cloudpickle when it is not (a function defined in a Jupyter cell, a
  closure, a lambda), if cloudpickle is installed (``pip install 'overdrive[notebook]'``);
- otherwise by "fork" where the platform has it (Linux, macOS), which copies the
  notebook's memory; CUDA must not have been initialised in the notebook then.

Failures never hang the caller: the parent watches every worker; the first rank that
raises (its traceback comes back) or exits without a result ends all the others (SIGTERM,
then SIGKILL after a grace period), and ``launch`` raises ``LaunchError`` naming the rank,
with the rank's own exception as ``__cause__`` when it can be pickled.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, Callable

from .errors import OverdriveError

_GRACE_S = 2.0  # SIGTERM → SIGKILL
_POLL_S = 0.05


class LaunchError(OverdriveError, RuntimeError):
    """A worker of ``od.launch`` raised or died; names the rank and carries its traceback
    (``.rank``, ``.remote_traceback``, ``.exitcode``)."""

    def __init__(self, message: str, *, rank: int, remote_traceback: str | None = None,
                 exitcode: int | None = None):
        super().__init__(message)
        self.rank, self.remote_traceback, self.exitcode = rank, remote_traceback, exitcode


class _RemoteTraceback(Exception):
    """The failing rank's formatted traceback, chained as ``__cause__``'s cause."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def launch(fn: Callable, *args: Any, nproc: int = 2, start_method: str | None = None,
           timeout: float | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``nproc`` worker processes; return rank 0's value.

    ``start_method``: None picks as the module docstring says; "spawn" or "fork" force
    one. ``timeout``: seconds after which the workers are ended and LaunchError raised.
    (``nproc``, ``start_method`` and ``timeout`` are launch's own; every other keyword
    goes to ``fn``.)
    """
    if not callable(fn):
        raise OverdriveError(f"od.launch(fn={fn!r}): fn must be callable")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise OverdriveError(f"od.launch(nproc={nproc!r}): give a positive number of processes")
    import multiprocessing as mp

    method, payload = _payload(fn, args, kwargs, start_method)
    ctx = mp.get_context(method)
    results = ctx.SimpleQueue()
    port = _free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": threads, "TORCHELASTIC_RUN_ID": f"od-launch-{port}"}
        # not daemonic: a worker may start its own processes (DataLoader workers); the
        # parent ends every worker itself, also when it is interrupted
        p = ctx.Process(target=_worker, args=(rank, env, payload, results),
                        name=f"overdrive-rank{rank}", daemon=False)
        p.start()
        procs.append(p)
    try:
        return _watch(procs, results, timeout)
    finally:
        _end_all(procs)


# --------------------------------------------------------------------------- the parent


def _payload(fn, args, kwargs, start_method) -> tuple[str, Any]:
    """(start method, what the worker unpickles into (fn, args, kwargs))."""
    job = (fn, args, kwargs)
    if start_method == "fork":
        return "fork", job
    if start_method not in (None, "spawn"):
        raise OverdriveError(f"od.launch(start_method={start_method!r}): use None, 'spawn' "
                             "or 'fork'")
    if _importable(fn):
        try:
            pickle.dumps(job)
            return "spawn", job
        except Exception:  # noqa: BLE001 — unpicklable arguments: try cloudpickle
            pass
    try:
        import cloudpickle
    except ImportError:
        cloudpickle = None
    if cloudpickle is not None:
        return "spawn", _Cloudpickled(cloudpickle.dumps(job))
    import multiprocessing as mp

    if start_method is None and "fork" in mp.get_all_start_methods():
        return "fork", job
    raise OverdriveError(
        f"od.launch: {getattr(fn, '__qualname__', fn)!r} cannot be sent to spawned workers "
        "(not importable, e.g. defined in a notebook cell) and cloudpickle is not installed; "
        "pip install 'overdrive[notebook]', or move fn into a module")


def _importable(fn) -> bool:
    """Plain pickle finds ``fn`` by name in the workers: a module-level function of a
    module, or of a script run as ``__main__`` (spawn re-runs it as ``__mp_main__``)."""
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname:  # <lambda>, <locals>
        return False
    if getattr(fn, "__module__", None) == "__main__":
        main = sys.modules.get("__main__")
        return bool(getattr(main, "__file__", None))  # no file: an interactive session
    return True


class _Cloudpickled:
    def __init__(self, data: bytes):
        self.data = data

    def load(self):
        return pickle.loads(self.data)


def _watch(procs, results, timeout: float | None) -> Any:
    """Wait for every rank's result; end everything at the first failure."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done: dict[int, Any] = {}
    while len(done) < len(procs):
        while not results.empty():
            rank, ok, value, text = results.get()
            if not ok:
                _end_all(procs)
                raise _failure(rank, value, text)
            done[rank] = value
        for rank, p in enumerate(procs):
            if rank not in done and p.exitcode is not None:
                time.sleep(_POLL_S)  # a result sent just before the exit
                if not results.empty():
                    break
                _end_all(procs)
                raise LaunchError(f"od.launch: rank {rank} exited with code {p.exitcode} "
                                  "before returning (killed, os._exit, or a crash); the other "
                                  "ranks were stopped", rank=rank, exitcode=p.exitcode)
        if deadline is not None and time.monotonic() > deadline:
            _end_all(procs)
            missing = [r for r in range(len(procs)) if r not in done]
            raise LaunchError(f"od.launch: timed out after {timeout} s waiting for rank(s) "
                              f"{missing}; all ranks were stopped", rank=missing[0])
        time.sleep(_POLL_S)
    return _load_result(done[0])


def _failure(rank: int, exc_bytes: bytes | None, text: str) -> LaunchError:
    err = LaunchError(f"od.launch: rank {rank} raised:\n{text}", rank=rank,
                      remote_traceback=text)
    cause = None
    if exc_bytes is not None:
        try:
            cause = pickle.loads(exc_bytes)
        except Exception:  # noqa: BLE001 — the text is enough
            cause = None
    if cause is not None:
        cause.__cause__ = _RemoteTraceback(text)
        err.__cause__ = cause
    return err


def _load_result(value: Any) -> Any:
    return pickle.loads(value) if isinstance(value, bytes) else value


def _end_all(procs) -> None:
    alive = [p for p in procs if p.exitcode is None]
    for p in alive:
        p.terminate()
    end = time.monotonic() + _GRACE_S
    for p in alive:
        p.join(max(0.0, end - time.monotonic()))
    for p in alive:
        if p.exitcode is None:
            p.kill()
            p.join(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the worker


def _worker(rank: int, env: dict[str, str], payload: Any, results) -> None:
    os.environ.update(env)
    try:
        job = payload.load() if isinstance(payload, _Cloudpickled) else payload
        fn, args, kwargs = job
        value = fn(*args, **kwargs)
        results.put((rank, True, pickle.dumps(value) if rank == 0 else None, ""))
    except BaseException as exc:  # noqa: BLE001 — every failure goes back to the parent
        text = traceback.format_exc()
        try:
            exc_bytes = pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            exc_bytes = None
        results.put((rank, False, exc_bytes, text))
        _destroy_group()
        os._exit(1)
    _destroy_group()


def _destroy_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 — the process is ending anyway
        pass
