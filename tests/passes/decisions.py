"""What each built-in pass really did to a model, read from the model itself (not from the
pass's record), and the comparison with what od.inspect decided. Shared by
test_decisions.py (one process) and decisions_worker.py (2 ranks under torchrun)."""

from __future__ import annotations

import torch
from torch import nn

import overdrive as od


def registry(module: nn.Module) -> set[str]:
    """The composable APIs (fully_shard, replicate) applied to ``module``."""
    from torch.distributed._composable.contract import _get_registry

    return set(_get_registry(module) or {})


def done(pass_name: str, rt) -> dict:
    """What ``pass_name`` did to ``rt.model``, as {"modules": [...], ...}."""
    model = rt.model
    named = dict(model.named_modules())
    if pass_name == "casting":
        from overdrive.passes.casting import CAST_CLASSES

        cast = tuple(CAST_CLASSES.values())
        return {"modules": [n for n, m in named.items() if isinstance(m, cast)]}
    if pass_name == "fp8":
        from torchao.float8.float8_linear import Float8Linear

        return {"modules": [n for n, m in named.items() if isinstance(m, Float8Linear)]}
    if pass_name == "checkpointing":
        from overdrive.passes.checkpointing import is_checkpointed

        return {"modules": [n for n, m in named.items() if is_checkpointed(m)],
                "selective": sorted({m.__dict__["_overdrive_checkpointed"]
                                     for m in named.values() if is_checkpointed(m)})}
    if pass_name == "compile":
        return {"modules": [n for n, m in named.items()
                            if m.__dict__.get("_compiled_call_impl") is not None]}
    if pass_name == "mixed_precision":
        contexts = rt._handoff.forward_contexts
        with contexts[0]():
            dtype = torch.get_autocast_dtype(rt.device.type)
        return {"modules": [""] if "forward" in model.__dict__ else [],
                "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]}
    if pass_name == "fsdp":
        return {"modules": [n for n, m in named.items() if "fully_shard" in registry(m)]}
    if pass_name == "ddp":
        return {"modules": [n for n, m in named.items() if "replicate" in registry(m)]}
    if pass_name == "deepspeed":
        engine = rt._engine
        return {"modules": [""] if engine is not None and engine.module is model else [],
                "zero_stage": engine.zero_optimization_stage()}
    if pass_name == "tensor_parallel":
        from torch.distributed.tensor import DTensor

        def sharded(m):
            return any(isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
                       for p in m.parameters(recurse=False))

        return {"sharded": sorted(n for n, m in named.items() if sharded(m)),
                "dtensor": sorted(n for n, m in named.items() if any(
                    isinstance(p, DTensor) for p in m.parameters(recurse=False)))}
    if pass_name == "context_parallel":
        return {"modules": [n for n, m in named.items() if n and "forward" in m.__dict__
                            and m.__dict__["forward"].__name__ == "forward"
                            and hasattr(m.__dict__["forward"], "__wrapped__")],
                "batch_transforms": len(rt._handoff.batch_transforms)}
    if pass_name == "offload":
        return {"tensors": _where_each_tensor_is(rt),
                "buffers": sorted({str(b.device) for b in model.buffers()})}
    raise KeyError(pass_name)


def _where_each_tensor_is(rt) -> dict[str, str]:
    """Each parameter's home, read from the model and the offload folder: ``disk`` (its
    key is in the folder's index), ``host`` (a one-element stand-in, not on disk) or the
    device its real data is on."""
    import json
    from pathlib import Path

    folder = rt.plan.offload.offload_folder
    index = Path(folder) / "index.json" if folder is not None else None
    on_disk = set(json.loads(index.read_text())["weight_map"]) if index and index.is_file() \
        else set()
    out = {}
    for name, p in rt.model.named_parameters():
        stand_in = p.numel() > 1 and all(s == 0 for s in p.stride())
        out[name] = "disk" if name in on_disk else "host" if stand_in else str(p.device)
    return out


def _offload_expected(rec, model) -> dict:
    from overdrive.passes.offload_placement import entry_device

    entries, execution = rec.details["device_map"], rec.details["execution_device"]

    def home(name):
        device = entry_device(entries, name)
        return "host" if device == "cpu" and execution != "cpu" else device

    return {"tensors": {n: home(n) for n, _ in model.named_parameters()},
            "buffers": [execution]}


def expected(pass_name: str, rec, model=None) -> dict:
    """What the dry-run record (the decision, rendered) says will be done, in the terms
    of ``done`` (``model``: the transformed model, for the names of its tensors)."""
    d = rec.details
    if pass_name == "offload":
        return _offload_expected(rec, model)
    if pass_name == "checkpointing":
        kind = "selective" if d["mode"] == "selective" else "full"
        return {"modules": rec.modules, "selective": [kind] if rec.modules else []}
    if pass_name == "mixed_precision":
        return {"modules": rec.modules, "dtype": d["dtype"]}
    if pass_name == "deepspeed":
        return {"modules": rec.modules, "zero_stage": d["zero_stage"]}
    if pass_name == "tensor_parallel":
        return {"sharded": sorted(d["sharded_modules"]), "dtensor": sorted(d["styles"])}
    if pass_name == "context_parallel":
        return {"modules": rec.modules, "batch_transforms": 1}
    if pass_name == "fsdp":
        return {"modules": sorted(rec.modules, key=_order(rec))}
    return {"modules": rec.modules}


def _order(rec):
    units = [n for u in rec.details["units"] for n in u]
    return lambda n: units.index(n)


DEVICE_DEPENDENT = {"device_type", "attention"}


def compare(pass_name: str, inspected: od.Report, rt) -> None:
    """od.inspect's decision == what od.accelerate recorded == what the model shows."""
    want, got = inspected[pass_name], rt.report[pass_name]
    assert want.modules == got.modules, (pass_name, want.modules, got.modules)
    # a dry run does not know the device: those facts are named as unknown there
    same = {k: v for k, v in want.details.items()
            if k in got.details and k not in DEVICE_DEPENDENT}
    assert same == {k: got.details[k] for k in same}, (pass_name, same, got.details)
    actual = done(pass_name, rt)
    if pass_name == "fsdp":
        actual["modules"] = sorted(actual["modules"], key=_order(got))
    wanted = expected(pass_name, want, rt.model)
    assert actual == wanted, (pass_name, actual, wanted)
