"""Where each module of a big model lives: the device map (GPU, CPU, disk).

``infer_device_map`` follows Hugging Face Accelerate's ``infer_auto_device_map`` meanings
(same assignments on the same model and budgets): the top-level entries are taken in
registration order and put on the first device with room; a module that does not fit is
split into its direct parameters and children unless it is a leaf or a ``no_split``
class; the main devices (the first GPU, the CPU) keep room for the largest unsplittable
layer (an offloaded one is brought there to run); tied parameters go with their first
user. ``"balanced"`` / ``"auto"`` / ``"balanced_low_0"`` first even out the GPU budgets
(``balanced_budgets``), ``"sequential"`` fills the devices in order.

Everything here reads sizes only: the model may be on the meta device.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import PlanError
from ..sizes import parse_size

log = logging.getLogger("overdrive")

HEADROOM_FRACTION = 0.10  # of free memory left for activations / allocator slack
MODES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class DeviceMap:
    """The placement: ``entries`` (module or tensor FQN → device, Accelerate's form),
    the device of every tensor, and the bytes each device holds."""

    entries: dict[str, str]
    tensors: dict[str, str]
    bytes_per_device: dict[str, int] = field(default_factory=dict)
    execution_device: str = "cpu"

    def device_of(self, name: str) -> str:
        return entry_device(self.entries, name)


# --------------------------------------------------------------------------- sizes


def tensor_size(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes ``t`` takes once loaded (floating tensors converted to ``dtype`` when smaller,
    as Accelerate counts them; integer and bool tensors keep theirs)."""
    size = t.element_size()
    if dtype is not None and t.is_floating_point():
        size = min(size, torch.empty((), dtype=dtype).element_size())
    return t.numel() * size


def module_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes under every prefix (``""`` is the whole model), tied tensors counted once,
    under their first name."""
    sizes: dict[str, int] = defaultdict(int)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor_size(t, dtype)
        parts = name.split(".")
        for i in range(len(parts) + 1):
            sizes[".".join(parts[:i])] += size
    return sizes


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter object, for every parameter that has several."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def parse_max_memory(max_memory: Mapping) -> dict[str, int]:
    """``{"cuda:0": "10GiB", 0: ..., "cpu": 2**30, "disk": ...}`` → ordered ``{device: bytes}``
    (GPUs by index, then cpu, then disk)."""
    parsed: dict[str, int] = {}
    for key, value in max_memory.items():
        device = normalise_device(key, "max_memory")
        try:
            parsed[device] = parse_size(value) if not isinstance(value, float) else int(value)
        except ValueError:
            raise PlanError(f"offload.max_memory[{key!r}]={value!r} is not valid; use bytes "
                            "or a size such as '10GiB' or '500MB'") from None
        if parsed[device] < 0:
            raise PlanError(f"offload.max_memory[{key!r}]={value!r} is negative")
    gpus = sorted((d for d in parsed if d.startswith("cuda:")), key=lambda d: int(d[5:]))
    return {d: parsed[d] for d in [*gpus, *(d for d in ("cpu", "disk") if d in parsed)]}


def normalise_device(key, what: str) -> str:
    """``0`` / ``"cuda"`` / ``"cuda:1"`` / ``"cpu"`` / ``"disk"`` → ``"cuda:N"``, ``"cpu"``, ``"disk"``."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"cuda:{key}"
    if isinstance(key, torch.device):
        key = str(key)
    if key in ("cpu", "disk"):
        return key
    if isinstance(key, str) and (key == "cuda" or (key.startswith("cuda:") and key[5:].isdigit())):
        return "cuda:0" if key == "cuda" else key
    raise PlanError(f"offload.{what}: device {key!r} is not valid; use 'cuda:N' (or an "
                    "integer GPU index), 'cpu' or 'disk'")


def free_memory() -> dict[str, int]:
    """What each device has free now, minus ``HEADROOM_FRACTION`` (the default budget)."""
    import psutil

    out: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            out[f"cuda:{i}"] = int(free * (1 - HEADROOM_FRACTION))
    out["cpu"] = int(psutil.virtual_memory().available * (1 - HEADROOM_FRACTION))
    return out


# --------------------------------------------------------------------------- the map


def _largest_layer(todo: list[tuple[str, object]], sizes: Mapping[str, int],
                   no_split: set[str]) -> tuple[int, list[str]]:
    """Size and names of the largest unsplittable layer among ``todo`` (a leaf module or
    a ``no_split`` class; tensors are not layers)."""
    best, names = 0, []
    stack = [(n, m) for n, m in todo if isinstance(m, nn.Module)]
    while stack:
        name, module = stack.pop(0)
        children = list(module.named_children())
        if children and type(module).__name__ not in no_split:
            stack = [(f"{name}.{c}", m) for c, m in children] + stack
            continue
        if sizes[name] > best:
            best, names = sizes[name], [name]
        elif sizes[name] == best:
            names.append(name)
    return best, names


def _inside(name: str, prefix: str) -> bool:
    return (name + ".").startswith(prefix + ".")


def _split(name: str, module: nn.Module) -> list[tuple[str, object]]:
    parts = [*module.named_parameters(recurse=False), *module.named_children()]
    return [(f"{name}.{n}", v) for n, v in parts]


def infer_device_map(model: nn.Module, max_memory: Mapping[str, int],
                     no_split: Iterable[str] = (), dtype: torch.dtype | None = None
                     ) -> dict[str, str]:
    """Accelerate's ``infer_auto_device_map`` assignment (see the module docstring)."""
    no_split = set(no_split)
    devices = list(max_memory) + ([] if "disk" in max_memory else ["disk"])
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main = {gpus[0], "cpu"} if gpus else {"cpu"}
    sizes = module_sizes(model, dtype)
    ties = tied_groups(model)
    todo: list[tuple[str, object]] = [*model.named_parameters(recurse=False),
                                      *model.named_children(),
                                      *model.named_buffers(recurse=False)]
    used = {d: 0 for d in devices}
    placed: dict[str, str] = {}
    current = 0
    largest, largest_names = _largest_layer(todo, sizes, no_split)
    while todo:
        name, module = todo.pop(0)
        largest_names = [n for n in largest_names if not _inside(n, name)]
        if not largest_names:
            largest, largest_names = _largest_layer(todo, sizes, no_split)
        size = sizes[name]
        outside = [p for g in ties if any(_inside(k, name) for k in g)
                   and not all(_inside(k, name) for k in g)
                   for p in g if not _inside(p, name)]
        tied_names = [next(n for n, _ in todo if p.startswith(n + ".")) for p in outside]
        tied_modules = [dict(todo)[n] for n in tied_names]
        with_ties = size + sum(sizes[m] - sizes[p] for p, m in zip(outside, tied_names))
        device = devices[current]
        reserved = largest if device in main else 0
        room = None if device == "disk" else max_memory[device] - reserved
        if room is None or used[device] + with_ties <= room:
            used[device] += with_ties
            placed[name] = device
            for tn in tied_names:
                todo = [(n, m) for n, m in todo if n != tn]
                placed[tn] = device
            continue
        if outside and used[device] + size <= room:
            splittable = [(tn, tm) for tn, tm in zip(tied_names, tied_modules)
                          if list(tm.named_children()) and type(tm).__name__ not in no_split]
            if splittable:
                tn, tm = splittable[0]
                i = next(i for i, (n, _) in enumerate(todo) if n == tn)
                todo = [(name, module), *todo[:i], *_split(tn, tm), *todo[i + 1:]]
                largest, largest_names = _largest_layer(todo, sizes, no_split)
                continue
        if used[device] + size >= room and isinstance(module, nn.Module) \
                and list(module.named_children()) and type(module).__name__ not in no_split:
            todo = _split(name, module) + todo
            largest, largest_names = _largest_layer(todo, sizes, no_split)
            continue
        used[device] += reserved
        current += 1
        todo = [(name, module), *todo]
    return merge_entries(placed)


def merge_entries(entries: dict[str, str]) -> dict[str, str]:
    """Entries under one module that all share a device become that one module's entry
    (Accelerate's ``clean_device_map``), keeping registration order."""
    out = dict(entries)

    def merge(prefix: str) -> None:
        under = [k for k in out if prefix == "" or _inside(k, prefix)]
        values = {out[k] for k in under}
        if len(values) == 1 and len(under) > 1:
            position = next(i for i, k in enumerate(out) if k in under)
            items = [(k, v) for k, v in out.items() if k not in under]
            items.insert(position, (prefix, values.pop()))
            out.clear()
            out.update(items)
            return
        depth = 0 if prefix == "" else prefix.count(".") + 1
        children = dict.fromkeys(".".join(k.split(".")[:depth + 1]) for k in under
                                 if len(k) > len(prefix))
        for child in children:
            merge(child)

    merge("")
    return out


def balanced_budgets(model: nn.Module, max_memory: dict[str, int], no_split: Iterable[str],
                     dtype: torch.dtype | None, low_zero: bool) -> dict[str, int]:
    """GPU budgets that spread the model evenly (Accelerate's ``get_balanced_memory``):
    each GPU but the last gets its share plus a buffer of 1.25 × max(the largest no-split
    block, the mean leaf module); ``low_zero`` keeps GPU 0 as empty as the others allow."""
    gpus = [d for d in max_memory if d.startswith("cuda:") and max_memory[d] > 0]
    if not gpus:
        return dict(max_memory)
    budgets = dict(max_memory)
    if len(gpus) == 1:
        low_zero = False
    sizes = module_sizes(model, dtype)
    per_gpu = sizes[""] // (len(gpus) - 1 if low_zero else len(gpus))
    no_split = set(no_split)
    block = max((sizes[n] for n, m in model.named_modules() if n and type(m).__name__ in no_split),
                default=0)
    modules = {n for n, _ in model.named_modules() if n}
    parents = {n.rsplit(".", 1)[0] for n in modules if "." in n}
    leaves = [n for n in modules if n not in parents and sizes.get(n, 0)]
    mean_leaf = int(sum(sizes[n] for n in leaves) / max(len(leaves), 1))
    per_gpu += int(1.25 * max(block, mean_leaf))
    for d in gpus[:-1]:
        budgets[d] = min(budgets[gpus[0]] if low_zero and d == gpus[0] else per_gpu, budgets[d])
    if low_zero:
        rest = sum(budgets[d] for d in gpus[1:])
        budgets[gpus[0]] = min(max(0, sizes[""] - rest), budgets[gpus[0]])
    return budgets


def entry_device(entries: Mapping[str, str], name: str) -> str:
    """The device of the longest entry that is ``name`` or a prefix of it."""
    best = None
    for key in entries:
        if key == "" or _inside(name, key):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise PlanError(f"offload.device_map: no entry covers {name!r}; add it (or one of "
                        "its parent modules) with a device")
    return entries[best]


def tensor_devices(model: nn.Module, entries: Mapping[str, str]) -> dict[str, str]:
    """The device of every parameter and buffer name (tied aliases included)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return {n: entry_device(entries, n) for n in names}


def bytes_per_device(model: nn.Module, tensors: Mapping[str, str],
                     dtype: torch.dtype | None) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[tensors[name]] += tensor_size(t, dtype)
    return dict(out)
