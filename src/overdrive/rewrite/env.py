"""``Env``: the world a pass runs in — ranks, device, mesh sizes, the mesh itself.

Every pass's ``check`` / ``apply`` sees it (as ``ctx.env``). It carries inputs only: what a
pass hands on goes back through the typed contributions of ``rewrite/contract.py``, never
through fields set on the environment. ``runtime/state.py`` builds it (process group,
device, DeviceMesh); a dry run (``od.inspect``) gets one with no process group and no mesh.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ..safetensors_io import WeightsSource

# the mesh's dims, outermost first
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def mesh_coordinates(rank: int, parallel: Any) -> dict[str, int]:
    """Row-major coordinates of ``rank`` in the (pp, dp_replicate, dp_shard, cp, tp) mesh
    of ``parallel``'s sizes."""
    sizes = [getattr(parallel, d) for d in MESH_DIMS]
    coords = {}
    for dim, size in zip(reversed(MESH_DIMS), reversed(sizes)):
        coords[dim] = rank % size
        rank //= size
    return coords


@dataclass
class Env:
    """The world a pass runs in. ``dry_run`` envs (od.inspect) have no process group.

    ``parallel`` holds the resolved mesh sizes (pp, dp_replicate, dp_shard, cp, tp).
    ``optimizer_factory`` is the user's optimizer as ``model -> optimizer`` (an engine pass
    builds it inside its engine); ``example_inputs`` are od.inspect's, for meta traces;
    ``weights`` is ``od.accelerate(weights=)``'s checkpoint, keys already checked (a
    ``safetensors_io.WeightsSource``: a pass that places the tensors streams from it).
    """

    parallel: Any
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dry_run: bool = False
    backend: str = "gloo"  # the collective backend of ``device`` (nccl, xccl, hccl, gloo)
    optimizer_factory: Callable[..., Any] | None = None
    example_inputs: Any = None
    weights: "WeightsSource | None" = None
    # od.inspect: whether the user's model is on the meta device (its shadow always is);
    # None in a real run, where the model itself says
    model_on_meta: bool | None = None
    # given by runtime/state.py: start the process group; build (mesh, flattened views)
    open_group: Callable[[], None] | None = field(default=None, repr=False)
    open_mesh: Callable[[], tuple[Any, dict[str, Any]]] | None = field(default=None, repr=False)
    _mesh: Any = field(default=None, repr=False)
    _flat: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def ensure_process_group(self) -> None:
        if self.dry_run or self.open_group is None:
            raise RuntimeError("a dry-run environment has no process group")
        self.open_group()

    @property
    def mesh(self):
        """The 5-D mesh (pp, dp_replicate, dp_shard, cp, tp) with flattened ``dp``,
        ``dp_shard_cp`` and ``dp_cp`` views; built on first use."""
        if self._mesh is None:
            if self.dry_run or self.open_mesh is None:
                raise RuntimeError("a dry-run environment has no DeviceMesh")
            self._mesh, self._flat = self.open_mesh()
        return self._mesh

    @property
    def mesh_built(self) -> bool:
        return self._mesh is not None

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
        coords = mesh_coordinates(self.rank, self.parallel)
        return coords["dp_replicate"] * self.parallel.dp_shard + coords["dp_shard"]
