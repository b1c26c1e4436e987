"""Process group, device and DeviceMesh from the plan and torchrun's environment.

Builds the ``Env`` (``rewrite/env.py``) every pass's ``check``/``apply`` receives: ranks,
device, and the means to open the process group and the mesh (lazily, so a single process
with no parallelism never needs a process group). The only module that writes
``os.environ`` (the rendezvous variables of a one-rank process group).

Under torchrun (``WORLD_SIZE`` > 1) the environment is always distributed — on CPU too,
with gloo. A run never silently trains each rank alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..launcher import die_with_parent
from ..plan_spec import Plan, resolve_for_world
from ..rewrite.env import MESH_DIMS, Env, mesh_coordinates  # noqa: F401  (re-exported)

log = logging.getLogger("overdrive")


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(local_rank: int) -> torch.device:
    """This rank's device: cuda, else xpu, else npu, else cpu. Ascend NPUs are found
    only once the user has ``import torch_npu`` (that import creates ``torch.npu``)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    for kind in ("xpu", "npu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            return torch.device(kind, local_rank % backend.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return {"cuda": "nccl", "xpu": "xccl", "npu": "hccl"}.get(device.type, "gloo")


def process_group_backend(device: torch.device) -> str:
    """The accelerator's backend with gloo for CPU tensors (objects, metrics) beside it."""
    backend = backend_for(device)
    return backend if backend == "gloo" else f"cpu:gloo,{device.type}:{backend}"


def set_current_device(device: torch.device) -> None:
    """Make ``device`` this process's current accelerator device (a no-op on CPU)."""
    if device.type in ("cpu", "meta"):
        return
    acc = getattr(torch, "accelerator", None)
    current = acc.current_accelerator() if acc is not None else None
    if current is not None and current.type == device.type:
        acc.set_device_index(device.index)
    else:  # an accelerator torch.accelerator does not report (e.g. torch_npu's)
        getattr(torch, device.type).set_device(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_PG_TIMEOUT = 600.0  # s: generous, for first-step compiles; desync_timeout is the early one


def timeout_from_env(timeout: float | None = None) -> datetime.timedelta:
    """The process-group timeout: ``od.accelerate(timeout=)``, else OVERDRIVE_PG_TIMEOUT,
    else 600 s."""
    if timeout is None:
        timeout = float(os.environ.get("OVERDRIVE_PG_TIMEOUT", DEFAULT_PG_TIMEOUT))
    return datetime.timedelta(seconds=float(timeout))


def ensure_process_group(device: torch.device, timeout: float | None = None) -> None:
    """Initialise the default process group once: torchrun's env, or a 1-rank group."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:  # a plain `python script.py`: a 1-rank group
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    kwargs: dict[str, Any] = {"backend": process_group_backend(device),
                              "timeout": timeout_from_env(timeout)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def build_mesh(plan: Plan, device: torch.device):
    """The 5-D mesh and its flattened views {"dp", "dp_shard_cp", "dp_cp"}.

    Size-1 dims are kept (every pass can slice every name); ``mesh["dp_shard_cp"]`` also
    works, but torch asks callers to keep the flattened meshes, so ``Env.submesh`` does.
    """
    from torch.distributed.device_mesh import init_device_mesh

    sizes = tuple(getattr(plan.parallel, d) for d in MESH_DIMS)
    mesh = init_device_mesh(device.type, sizes, mesh_dim_names=MESH_DIMS)
    flat = {
        "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
        "dp_shard_cp": mesh["dp_shard", "cp"]._flatten("dp_shard_cp"),
        "dp_cp": mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
    }
    return mesh, flat


def env_for(plan: Plan, *, rank: int, local_rank: int, world_size: int,
            device: torch.device, dry_run: bool = False, timeout: float | None = None) -> Env:
    """The ``Env`` of one rank of a world of ``world_size`` under ``plan`` (sizes resolved):
    a real one opens the process group (``timeout``: od.accelerate's, in s) and the mesh on
    first use."""
    if dry_run:
        return Env(plan.parallel, rank=rank, local_rank=local_rank, world_size=world_size,
                   device=device, dry_run=True, backend=backend_for(device))
    return Env(plan.parallel, rank=rank, local_rank=local_rank, world_size=world_size,
               device=device, backend=backend_for(device),
               open_group=lambda: ensure_process_group(device, timeout),
               open_mesh=lambda: _open_mesh(plan, device, timeout))


def _open_mesh(plan: Plan, device: torch.device, timeout: float | None = None):
    ensure_process_group(device, timeout)
    from .mesh_cache import shared_mesh  # one mesh per process and layout

    return shared_mesh(plan, device, build_mesh)


def make_env(plan: Plan, *, world_size: int | None = None, dry_run: bool = False,
             timeout: float | None = None) -> tuple[Plan, Env]:
    """Resolve the plan's sizes against the world and build the ``Env``.

    For a real run the world is torchrun's (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
    ``od.inspect`` passes ``world_size`` and ``dry_run=True``.
    """
    if dry_run:
        ws = world_size if world_size is not None else launched_world_size()
        if not isinstance(ws, int) or ws < 1:
            raise PlanError(f"world_size={ws!r} is not valid; use an integer >= 1")
        plan = resolve_for_world(plan, ws)
        return plan, env_for(plan, rank=0, local_rank=0, world_size=ws,
                             device=torch.device("meta"), dry_run=True)
    ws = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if world_size is not None and world_size != ws:
        raise PlanError(f"world_size={world_size} does not match the launched world ({ws})")
    plan = resolve_for_world(plan, ws)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    env = env_for(plan, rank=rank, local_rank=local_rank, world_size=ws, device=device,
                  timeout=timeout)
    set_current_device(device)  # before the process group: nccl/xccl bind to it
    die_with_parent()  # under `overdrive launch` only: a worker never outlives torchrun
    if ws > 1:
        env.ensure_process_group()
    return plan, env
