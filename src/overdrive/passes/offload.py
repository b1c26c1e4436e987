"""offload: big-model inference across GPU, CPU and disk.

``check`` works out the device map (``offload_placement.infer_device_map``: Accelerate's
assignments) from sizes alone and returns it as the decision, so ``od.inspect`` shows
module → device and the bytes each device holds. ``apply`` places every tensor where that
decision says — resident on the execution device, kept in host memory, or written to the
offload folder — either from the model's own weights or streamed from ``weights=``
(``ctx.env.weights``) one tensor at a time (``place``), then hooks each offloaded unit
(``offload_hooks``). Buffers always stay on the execution device (they are small and read
by parents). ``offload_placement``, ``offload_store`` and ``offload_hooks`` are this
pass's own helper modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import BackendUnavailable, PlanError
from ..plan_spec import Offload
from ..rewrite.contract import Applied, Decision, MemoryEffect, Pass, PassContext
from ..rewrite.manager import register_pass
from ..safetensors_io import WeightsSource, fingerprint
from . import offload_placement as pl
from .offload_hooks import Offloader, Unit, placeholder
from .offload_store import DiskFolder, OffloadStore, reusable


@dataclass
class Placed:
    """What placing the model produced: the offloaded tensors' store and whether an
    existing offload folder was reused."""

    store: OffloadStore = field(default_factory=OffloadStore)
    reused_folder: bool = False


# --------------------------------------------------------------------------- the map


def target_dtype(cfg: Offload | None) -> torch.dtype | None:
    return getattr(torch, cfg.dtype) if cfg is not None and cfg.dtype else None


def no_split_classes(model: nn.Module, cfg: Offload, blocks: list[str]) -> set[str]:
    if cfg.no_split is not None:
        return set(cfg.no_split)
    return {type(model.get_submodule(b)).__name__ for b in blocks}


def resolve_device_map(model: nn.Module, cfg: Offload, blocks: list[str]) -> pl.DeviceMap:
    """The device map ``cfg`` asks for on ``model``; PlanError when it cannot be had."""
    dtype = target_dtype(cfg)
    if isinstance(cfg.device_map, Mapping):
        entries = _user_entries(model, cfg.device_map)
    else:
        budgets = pl.parse_max_memory(cfg.max_memory) if cfg.max_memory is not None \
            else pl.free_memory()
        no_split = no_split_classes(model, cfg, blocks)
        if cfg.device_map != "sequential":
            budgets = pl.balanced_budgets(model, budgets, no_split, dtype,
                                          low_zero=cfg.device_map == "balanced_low_0")
        entries = pl.infer_device_map(model, budgets, no_split, dtype)
        if "disk" not in budgets and cfg.max_memory is not None:
            _refuse_disk(model, entries, dtype, budgets)
    tensors = pl.tensor_devices(model, entries)
    used = set(entries.values())
    gpus = sorted((d for d in used if d.startswith("cuda:")), key=lambda d: int(d[5:]))
    for d in gpus:
        if not torch.cuda.is_available() or int(d[5:]) >= torch.cuda.device_count():
            raise BackendUnavailable(f"offload.device_map puts modules on {d}, which this "
                                     "machine does not have; use 'cpu' / 'disk' or a present GPU")
    if "disk" in used and cfg.offload_folder is None:
        on_disk = pl.bytes_per_device(model, tensors, dtype).get("disk", 0)
        raise PlanError(f"offload.offload_folder=None, but the device map puts {on_disk} bytes "
                        "on disk; give offload_folder='path/to/folder' (or more max_memory)")
    return pl.DeviceMap(entries, tensors, pl.bytes_per_device(model, tensors, dtype),
                        execution_device=gpus[0] if gpus else "cpu")


def _user_entries(model: nn.Module, device_map: Mapping[str, str]) -> dict[str, str]:
    modules = dict(model.named_modules())
    tensors = {n for n, _ in [*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False)]}
    entries = {}
    for name, device in device_map.items():
        if name not in modules and name not in tensors:
            raise PlanError(f"offload.device_map[{name!r}]: {type(model).__name__} has no "
                            "module or tensor of that name; use qualified names such as "
                            "'model.layers.0' (or '' for the whole model)")
        entries[name] = pl.normalise_device(device, f"device_map[{name!r}]")
    return entries


def _refuse_disk(model, entries, dtype, budgets) -> None:
    tensors = pl.tensor_devices(model, entries)
    missing = pl.bytes_per_device(model, tensors, dtype).get("disk", 0)
    if missing:
        shown = ", ".join(f"{d}={b}" for d, b in budgets.items())
        raise PlanError(f"offload.max_memory ({shown}) cannot hold the model: {missing} bytes "
                        "more are needed (the main devices also keep room for the largest "
                        "block); raise max_memory or add 'disk' (with offload_folder)")


# --------------------------------------------------------------------------- placing


def _aliases(model: nn.Module) -> list[tuple[str, list[str], nn.Parameter]]:
    """(first name, every name, parameter) for each parameter object."""
    groups: dict[int, tuple[str, list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (name, [], p))[1].append(name)
    return list(groups.values())


def _set_param(model: nn.Module, names: list[str], param: nn.Parameter) -> None:
    for name in names:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = param


def _offloaded(device: str, execution: str) -> bool:
    return device == "disk" or (device == "cpu" and execution != "cpu")


def _convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def _final_dtype(current: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and current.is_floating_point() else current.dtype


@torch.no_grad()
def place(model: nn.Module, dmap: pl.DeviceMap, dtype: torch.dtype | None,
          folder: str | None, source: WeightsSource | None,
          no_split: set[str] = frozenset()) -> Placed:
    """Every parameter to its home (from ``source`` when given, one tensor at a time),
    every buffer to the execution device; offloaded ones become placeholders. Disk
    tensors are written one unit (block) per file, one unit in memory at a time."""
    execution = torch.device(dmap.execution_device)
    placed = Placed()
    disk_groups: dict[str, list[tuple[str, list[str], nn.Parameter]]] = {}
    for first, names, p in _aliases(model):
        home = dmap.tensors[first]
        want = _final_dtype(p, dtype)
        if home == "disk":
            unit = _hook_module(model, first.rpartition(".")[0], no_split)
            disk_groups.setdefault(unit, []).append((first, names, p))
            continue
        t = source.read(first) if source is not None else p.detach()
        t = _convert(t, want)
        if _offloaded(home, dmap.execution_device):
            placed.store.host[first] = t.pin_memory() if execution.type == "cuda" else t
            t = placeholder(t, execution, want)
        else:
            t = t.to(home)
        _set_param(model, names, nn.Parameter(t, requires_grad=p.requires_grad))
    if disk_groups:
        _write_disk(model, disk_groups, dtype, folder, source, placed, execution)
    _place_buffers(model, execution, source)
    return placed


def _write_disk(model, groups, dtype, folder, source, placed: Placed, execution) -> None:
    folder = Path(folder)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
    expected = {first: (_final_dtype(p, dtype), tuple(p.shape))
                for members in groups.values() for first, _, p in members}
    stamp = fingerprint(source.entries) if source is not None else None
    entries = reusable(folder, stamp, dtype_name, expected)
    if entries is not None:
        placed.reused_folder = True
    else:
        writer = DiskFolder(folder, stamp, dtype_name)
        entries = {}
        for i, (unit, members) in enumerate(groups.items()):
            tensors = {}
            for first, _, p in members:
                t = source.read(first) if source is not None else p.detach()
                tensors[first] = _convert(t, _final_dtype(p, dtype)).cpu()
            entries.update(writer.write(i, unit, tensors))
            del tensors
        writer.finish()
    placed.store.disk.update(entries)
    for members in groups.values():
        for first, names, p in members:
            stand_in = placeholder(p, execution, _final_dtype(p, dtype))
            _set_param(model, names, nn.Parameter(stand_in, requires_grad=p.requires_grad))


def _place_buffers(model: nn.Module, device: torch.device, source: WeightsSource | None) -> None:
    """Persistent buffers from the checkpoint (or as they are), non-persistent meta ones
    recomputed by transformers' ``_init_weights`` (rotary tables), all on ``device``."""
    persistent = set(model.state_dict(keep_vars=True))
    for mname, module in model.named_modules():
        recompute = False
        for bname, b in list(module._buffers.items()):
            if b is None:
                continue
            key = f"{mname}.{bname}" if mname else bname
            if source is not None and source.holds(key):
                module._buffers[bname] = source.read(key).to(b.dtype).to(device)
            elif b.is_meta:
                module._buffers[bname] = torch.empty_like(b, device=device)
                recompute = key not in persistent or recompute
            else:
                module._buffers[bname] = b.to(device)
        if recompute:
            model._init_weights(module)


def meta_buffer_problems(model: nn.Module) -> list[str]:
    """Non-persistent buffers on the meta device nothing can fill (no checkpoint holds
    them; only transformers' ``_init_weights`` recomputes them, for parameter-free
    modules such as rotary embeddings)."""
    persistent = set(model.state_dict(keep_vars=True))
    can_init = callable(getattr(model, "_init_weights", None))
    bad = []
    for mname, module in model.named_modules():
        for bname, b in module._buffers.items():
            key = f"{mname}.{bname}" if mname else bname
            if b is not None and b.is_meta and key not in persistent:
                if not can_init or any(True for _ in module.parameters(recurse=False)):
                    bad.append(key)
    return bad


def build_units(model: nn.Module, dmap: pl.DeviceMap, no_split: set[str]) -> list[Unit]:
    """One unit per hooked module, in module order. An offloaded parameter is brought in
    by the outermost ``no_split`` block (a decoder layer) holding it, else by the module
    owning it: a unit is never larger than a block, and every module whose forward
    uses it (tied aliases in resident modules too) brings it in."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    units: dict[str, Unit] = {}
    for first, names, p in _aliases(model):
        if not _offloaded(dmap.tensors[first], dmap.execution_device):
            continue
        for name in names:
            hooked = _hook_module(model, name.rpartition(".")[0], no_split)
            unit = units.setdefault(hooked, Unit(hooked, [], []))
            if first not in unit.keys:
                unit.keys.append(first)
                unit.params.append(p)
    return sorted(units.values(), key=lambda u: order[u.module])


def _hook_module(model: nn.Module, owner: str, no_split: set[str]) -> str:
    parts = owner.split(".") if owner else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if type(model.get_submodule(prefix)).__name__ in no_split:
            return prefix
    return owner


# --------------------------------------------------------------------------- the pass


@dataclass(kw_only=True)
class OffloadDecision(Decision):
    """``device_map``: every module's and tensor's device and the bytes each device holds;
    ``no_split``: the classes a unit never splits (the blocks'); ``dtype``: the dtype
    floating weights are placed in (None: as they are); ``folder``: the disk offload
    folder; ``prefetch``: blocks read ahead."""

    device_map: pl.DeviceMap
    no_split: frozenset[str]
    dtype: torch.dtype | None
    folder: str | None
    prefetch: int


def decide(model: nn.Module, cfg: Offload, blocks: list[str]) -> OffloadDecision:
    dmap = resolve_device_map(model, cfg, blocks)
    shown = ", ".join(f"{d}: {b / 2**20:.1f} MiB" for d, b in dmap.bytes_per_device.items())
    return OffloadDecision(
        modules=list(dmap.entries),
        notes=[f"device map ({len(dmap.entries)} entries) runs on {dmap.execution_device}; "
               f"{shown}; prefetch {cfg.prefetch} block(s) ahead"],
        details={"device_map": dict(dmap.entries),
                 "bytes_per_device": dict(dmap.bytes_per_device),
                 "execution_device": dmap.execution_device},
        device_map=dmap, no_split=frozenset(no_split_classes(model, cfg, blocks)),
        dtype=target_dtype(cfg),
        folder=None if cfg.offload_folder is None else str(cfg.offload_folder),
        prefetch=cfg.prefetch,
        memory=MemoryEffect(inference=True, notes=(
            "offload is an inference plan: no gradients, no optimizer state",)))


@register_pass("offload", config=Offload, after=("casting",))
class OffloadPass(Pass):
    """Inference: place the model across devices and disk, bring weights in per block."""

    def check(self, ctx: PassContext) -> OffloadDecision:
        return decide(ctx.graph.model, ctx.cfg, ctx.graph.blocks())

    def apply(self, model: nn.Module, decision: OffloadDecision, ctx: PassContext) -> Applied:
        dmap = decision.device_map
        placed = place(model, dmap, decision.dtype, decision.folder, ctx.env.weights,
                       decision.no_split)
        units = build_units(model, dmap, decision.no_split)
        offloader = Offloader(units, placed.store, torch.device(dmap.execution_device),
                              decision.prefetch)
        offloader.install(model)  # the hooks hold the offloader
        rec = self.preview(decision, ctx)
        rec.details["units"] = len(offloader.units)
        rec.details["offload_folder_reused"] = placed.reused_folder
        return Applied(rec)
