"""The model of a DeepSpeed checkpoint for ``overdrive export``: DeepSpeed's own
``zero_to_fp32`` consolidates the ZeRO partitions (any stage, any number of ranks), with
each of its ``torch.load`` calls made ``weights_only=True`` admitting only the plain-data
DeepSpeed classes ``checkpoint_deepspeed.py`` lists: a pickled object of any other class
is refused, not run. Its files were verified against the manifest before. The
consolidated fp32 state is held in memory whole (DeepSpeed's function returns it so).
ZeRO stage 0 writes no partitions: the module's state saved beside them is used.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import types
from pathlib import Path
from unittest import mock

import torch

from ..errors import CheckpointCorrupt
from . import checkpoint_deepspeed as ds
from . import checkpoint_files as cf
from .checkpoint_export import Source


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` as zero_to_fp32 sees it: everything is torch's, ``load`` is weights-only."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **kwargs):
        try:
            with torch.serialization.safe_globals(ds._allowed_classes()):
                return torch.load(f, map_location=map_location, mmap=mmap, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise CheckpointCorrupt(
                f"{f} could not be read with weights_only=True ({ds._reason(e)}); the file is "
                "corrupted or holds objects overdrive does not unpickle") from None


def deepspeed_source(path: Path, manifest: dict[str, dict[str, int]],
                     tied: dict[str, str]) -> Source:
    unlisted = [n for n in cf.data_files(path) if n.startswith(ds.SUBDIR + "/") and n not in manifest]
    if unlisted:
        raise CheckpointCorrupt(f"{path} holds file(s) the manifest does not list: "
                                f"{', '.join(unlisted[:10])}; refusing to read them")
    state = _consolidated(path / ds.SUBDIR)
    state = {k: v for k, v in state.items() if k not in tied and isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointCorrupt(f"checkpoint {path} holds no model tensors")
    entries = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return Source(entries, lambda keys: {k: state[k] for k in keys})


def _consolidated(sub: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils import zero_to_fp32

    tag_dir = sub / ds.TAG
    quiet = contextlib.redirect_stdout(io.StringIO())  # zero_to_fp32 prints its progress
    with mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()), quiet:
        if not list(tag_dir.glob("*optim_states.pt")):  # ZeRO 0: the module state is whole
            files = sorted(tag_dir.glob("*model_states.pt"))
            if not files:
                raise CheckpointCorrupt(f"{tag_dir} holds no DeepSpeed model states")
            return dict(zero_to_fp32.torch.load(str(files[0]), map_location="cpu")["module"])
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(sub), tag=ds.TAG)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CheckpointCorrupt(f"DeepSpeed could not consolidate {sub} "
                                    f"({type(e).__name__}: {e})") from None
