"""One DeviceMesh per process and layout, shared by every ``od.accelerate`` call.

A second runtime in the same process (a distillation teacher, an EMA copy, a GAN
discriminator) with the same mesh sizes reuses the first one's mesh and its flattened
views instead of creating another set of process groups (``init_device_mesh`` makes new
sub-groups on every call: with NCCL each costs communicators and memory). A mesh belongs
to the default process group it was built on: after ``destroy_process_group`` and a new
``init_process_group`` it is built again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist

_MESHES: dict[tuple, tuple[Any, Any, dict]] = {}  # key → (default group, mesh, flat views)


def shared_mesh(plan, device: torch.device, build: Callable[..., tuple[Any, dict]]):
    """``build(plan, device)``'s (mesh, flattened views), built once per default process
    group, device type and mesh sizes."""
    key = (device.type, dataclasses.replace(plan.parallel, sequence_parallel=False))
    world = dist.group.WORLD
    hit = _MESHES.get(key)
    if hit is not None and hit[0] is world:
        return hit[1], hit[2]
    mesh, flat = build(plan, device)
    _MESHES[key] = (world, mesh, flat)
    return mesh, flat
