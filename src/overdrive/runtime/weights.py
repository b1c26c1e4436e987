"""Open a safetensors checkpoint and check it against a model, before anything is touched.

``open_weights`` reads only the headers of a ``.safetensors`` file or of a sharded
directory (``model.safetensors.index.json``): every key's file, dtype, shape and byte
range. ``check_keys`` compares a checkpoint with a model (meta or real) before anything is
touched. The reads themselves are ``overdrive/safetensors_io.py``'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import CheckpointCorrupt, CheckpointMismatch, NotACheckpoint
from ..safetensors_io import TensorEntry, read_header
from .export import INDEX, SINGLE, weight_files


def open_weights(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every key of a safetensors file or export directory, from the headers only."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    if not path.is_dir():
        raise NotACheckpoint(f"weights={str(path)!r}: no such file or directory; pass a "
                             f".safetensors file or a directory written by save_pretrained "
                             "or rt.export")
    if not (path / INDEX).is_file() and not (path / SINGLE).is_file():
        raise NotACheckpoint(f"weights={str(path)!r} holds neither {SINGLE} nor {INDEX}; pass "
                             "a directory written by save_pretrained or rt.export")
    files = weight_files(path)
    entries: dict[str, TensorEntry] = {}
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    for key, f in files.items():
        if key not in headers[f]:
            raise CheckpointCorrupt(f"{path / INDEX} maps {key!r} to {f.name}, which does "
                                    "not hold it")
        entries[key] = headers[f][key]
    return entries


def model_keys(model: nn.Module) -> list[list[str]]:
    """State-dict keys grouped by tensor: tied aliases together, first name first."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return list(groups.values())


def check_keys(model: nn.Module, entries: dict[str, TensorEntry], where: str) -> dict[str, str]:
    """``{model key: checkpoint key}`` for every tensor of ``model``; a missing, unexpected
    or differently shaped key raises ``CheckpointMismatch`` listing them all."""
    sd = model.state_dict(keep_vars=True)
    chosen: dict[str, str] = {}
    missing, mismatched = [], []
    covered: set[str] = set()
    for aliases in model_keys(model):
        covered.update(aliases)
        present = [a for a in aliases if a in entries]
        if not present:
            missing.append(aliases[0])
            continue
        shape = tuple(sd[aliases[0]].shape)
        for a in present:
            if entries[a].shape != shape:
                mismatched.append(f"{a} (checkpoint {list(entries[a].shape)}, model "
                                  f"{list(shape)})")
        chosen[aliases[0]] = present[0]
    unexpected = sorted(set(entries) - covered)
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(
            f"weights {where} do not fit {type(model).__name__}: "
            f"missing ({len(missing)}): {', '.join(missing[:20]) or '-'}; "
            f"unexpected ({len(unexpected)}): {', '.join(unexpected[:20]) or '-'}; "
            f"shape mismatch ({len(mismatched)}): {', '.join(mismatched[:20]) or '-'}")
    return chosen
