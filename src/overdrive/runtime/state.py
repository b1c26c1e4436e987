"""Process group, device and DeviceMesh from the plan and torchrun's environment.

``Env`` is what every pass's ``check``/``apply`` receives: ranks, device, the mesh (built
lazily, so a single process with no parallelism never needs a process group) and the
hand-off slots through which passes give the runtime what it must call later
(post-optimizer-step hooks, forward contexts, an engine that owns backward/step).

Under torchrun (``WORLD_SIZE`` > 1) the environment is always distributed — on CPU too,
with gloo. A run never silently trains each rank alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..launcher import die_with_parent
from ..rewrite.plan import Plan, resolve_for_world

log = logging.getLogger("overdrive")

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


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


@dataclass
class Env:
    """The world a pass runs in. ``dry_run`` envs (od.inspect) have no process group."""

    plan: Plan
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dry_run: bool = False
    # od.inspect: the user's model itself is on the meta device (not just the dry run's copy)
    model_on_meta: bool = False
    _mesh: Any = None
    _flat: dict[str, Any] = field(default_factory=dict)  # flattened meshes by name
    # hand-off slots, filled by passes, read by the runtime
    optimizer_factory: Callable[..., Any] | None = None
    post_step_hooks: list[Callable[..., None]] = field(default_factory=list)
    forward_contexts: list[Callable[[], AbstractContextManager]] = field(default_factory=list)
    engine: Any = None  # e.g. a DeepSpeed engine that owns backward/step
    # fn(bool): turn gradient all-reduce on/off (DDP no_sync, FSDP2
    # set_requires_gradient_sync); set by the data-parallel pass, called by rt.accumulate
    set_gradient_sync: Callable[[bool], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    pg_timeout: float | None = None  # od.accelerate(timeout=): the process group's, in s

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return backend_for(self.device)

    @property
    def parallel(self):
        return self.plan.parallel

    def ensure_process_group(self) -> None:
        if self.dry_run:
            raise RuntimeError("a dry-run environment has no process group")
        ensure_process_group(self.device, self.pg_timeout)

    @property
    def mesh(self):
        """The 5-D mesh (pp, dp_replicate, dp_shard, cp, tp) with flattened ``dp``,
        ``dp_shard_cp`` and ``dp_cp`` views; built on first use."""
        if self._mesh is None:
            if self.dry_run:
                raise RuntimeError("a dry-run environment has no DeviceMesh")
            self.ensure_process_group()
            from .mesh_cache import shared_mesh

            self._mesh, self._flat = shared_mesh(self.plan, self.device, build_mesh)
        return self._mesh

    def submesh(self, *names: str):
        """A named view of the mesh: a dim (``"tp"``), a flattened dim (``"dp"``,
        ``"dp_shard_cp"``, ``"dp_cp"``, kept from ``_flatten`` as torch asks) or a 2-D
        slice such as ``("dp_replicate", "dp_shard_cp")`` for HSDP."""
        mesh = self.mesh
        if len(names) == 1 and names[0] in self._flat:
            return self._flat[names[0]]
        if names == ("dp_replicate", "dp_shard_cp") and self.parallel.cp == 1:
            names = ("dp_replicate", "dp_shard")  # the same ranks, no flattened slice
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            return mesh[names if len(names) > 1 else names[0]]

    @property
    def dp_size(self) -> int:
        return self.parallel.dp_replicate * self.parallel.dp_shard

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: TP, CP and PP peers share it (they see the same batch)."""
        coords = mesh_coordinates(self.rank, self.plan)
        return coords["dp_replicate"] * self.parallel.dp_shard + coords["dp_shard"]


def mesh_coordinates(rank: int, plan: Plan) -> dict[str, int]:
    """Row-major coordinates of ``rank`` in the (pp, dp_replicate, dp_shard, cp, tp) mesh."""
    sizes = [getattr(plan.parallel, d) for d in MESH_DIMS]
    coords = {}
    for dim, size in zip(reversed(MESH_DIMS), reversed(sizes)):
        coords[dim] = rank % size
        rank //= size
    return coords


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
        return plan, Env(plan, rank=0, local_rank=0, world_size=ws,
                         device=torch.device("meta"), dry_run=True)
    ws = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if world_size is not None and world_size != ws:
        raise PlanError(f"world_size={world_size} does not match the launched world ({ws})")
    plan = resolve_for_world(plan, ws)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    env = Env(plan, rank=rank, local_rank=local_rank, world_size=ws, device=device,
              pg_timeout=timeout)
    set_current_device(device)  # before the process group: nccl/xccl bind to it
    die_with_parent()  # under `overdrive launch` only: a worker never outlives torchrun
    if ws > 1:
        env.ensure_process_group()
    return plan, env
