"""The ``deepspeed/`` part of a checkpoint saved from a DeepSpeed engine (the engine a pass handed on).

DeepSpeed writes and reads its own files (``engine.save_checkpoint`` / ``load_checkpoint``,
resharding by DeepSpeed's rules). Two things are added around it:

- save: every rank fsyncs the ``deepspeed/`` subtree once its own ``save_checkpoint``
  returned (DeepSpeed does not fsync), so the files are on disk before the rename.
- load: DeepSpeed unpickles its files with ``torch.load(weights_only=False)``. For the
  length of ``load_checkpoint`` the engine's checkpoint engine is replaced by one that
  reads with ``weights_only=True``, admitting only the plain-data DeepSpeed classes its
  files hold (the ZeRO stage enum, the loss scaler, fragment addresses): a pickled object
  of any other class is refused, not run. Every file under ``deepspeed/`` must be listed in
  the manifest. Configurations whose loads bypass the checkpoint engine (universal
  checkpoints, NVMe-offloaded optimizer state) are refused.

What stays trusted: DeepSpeed's own loading code, which decides from the files' contents
what to restore (as for any DeepSpeed checkpoint). The manifest's crc32 detects damage,
not tampering: it is not a signature.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointCorrupt, CheckpointMismatch
from . import checkpoint_files as cf

SUBDIR = "deepspeed"
TAG = "state"

# Plain data classes DeepSpeed pickles into its optimizer files (checked with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 1/2/3 saves).
_ALLOWED = ("deepspeed.runtime.zero.config.ZeroStageEnum",
            "deepspeed.runtime.fp16.loss_scaler.LossScaler",
            "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
            "deepspeed.utils.tensor_fragment.fragment_address")


def save(engine, root: Path) -> None:
    engine.save_checkpoint(str(root / SUBDIR), tag=TAG)
    cf.fsync_tree(root / SUBDIR)


def check_loadable(engine, root: Path, manifest: dict[str, dict[str, int]]) -> None:
    """Everything that can refuse a DeepSpeed load, before anything is loaded."""
    if engine is None:
        raise CheckpointMismatch(f"{root} was saved by a DeepSpeed engine; load it with the "
                                 "same deepspeed plan")
    for what, on in (("checkpoint.load_universal", _call(engine, "load_universal_checkpoint")),
                     ("zero_optimization.offload_optimizer.device=nvme",
                      _call(engine, "zero_nvme_offload_optimizer")),
                     ("MoE layers", getattr(engine, "has_moe_layers", False))):
        if on:
            raise CheckpointMismatch(
                f"loading {root} with DeepSpeed {what} is not supported: those files are "
                "not read (or not known to be readable) through the weights_only reader; "
                "turn it off in deepspeed.config")
    sub = root / SUBDIR
    if not sub.is_dir():
        raise CheckpointCorrupt(f"{sub} is missing")
    unlisted = [n for n in cf.data_files(root) if n.startswith(SUBDIR + "/") and n not in manifest]
    if unlisted:
        raise CheckpointCorrupt(f"{root} holds file(s) the manifest does not list: "
                                f"{', '.join(unlisted[:10])}; refusing to let DeepSpeed read them")


def load(engine, root: Path) -> None:
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnly(inner)
    try:
        load_path, _ = engine.load_checkpoint(str(root / SUBDIR), tag=TAG)
    finally:
        engine.checkpoint_engine = inner
    if load_path is None:
        raise CheckpointCorrupt(f"DeepSpeed could not load {root / SUBDIR}")


def _call(obj: Any, name: str) -> bool:
    fn = getattr(obj, name, None)
    return bool(fn()) if callable(fn) else False


def _allowed_classes() -> list[type]:
    import importlib

    out = []
    for dotted in _ALLOWED:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: not needed there
            continue
    return out


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)",
                "Please file an issue")


def _reason(e: BaseException) -> str:
    """The informative line of torch's long weights_only error (which global was refused)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)] or lines
    if not useful:
        return type(e).__name__
    return useful[0].removeprefix("WeightsUnpickler error: ").split(". Please use", 1)[0]


class _WeightsOnly:
    """The engine's checkpoint engine with ``load`` through ``weights_only=True``."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_allowed_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"DeepSpeed checkpoint file {path} is missing") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise CheckpointCorrupt(
                f"{path} could not be read with weights_only=True ({_reason(e)}); the file is "
                "corrupted or holds objects overdrive does not unpickle") from None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
