"""Nothing in a checkpoint directory runs code or reads outside the directory."""

import json

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf

from ckpt_util import CountingLoader, make_model, manual_runtime, train_step


def _saved(tmp_path):
    model = make_model(2, seed=0)
    rt = manual_runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    loader = CountingLoader()
    rt._loaders.append(loader)
    train_step(rt, loader)
    rt.save(tmp_path / "ck")
    return rt, tmp_path / "ck"


def _fix_manifest(ck, *names):
    """What an attacker who edits files also does: make the manifest agree."""
    manifest = json.loads((ck / cf.MANIFEST).read_text())
    for name in names:
        manifest["files"][name] = {"size": (ck / name).stat().st_size,
                                   "crc32": cf.crc32_file(ck / name)}
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))


def _str(s: str) -> bytes:  # pickle's SHORT_BINUNICODE
    return b"\x8c" + bytes([len(s)]) + s.encode()


def _dotted_global_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL(module, name)(arg) — name resolved attribute by attribute."""
    return b"\x80\x04" + _str(module) + _str(name) + b"\x93" + _str(arg) + b"\x85R."


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.filesystem", "os.system"),
    ("torch.distributed.checkpoint.metadata", "Metadata.__init__.__globals__"),
    ("torch.distributed.checkpoint", "os.system"),
    ("torch", "Size.__class__"),
])
def test_dotted_global_in_metadata_is_refused(tmp_path, monkeypatch, module, name):
    monkeypatch.chdir(tmp_path)
    rt, ck = _saved(tmp_path)
    (ck / ".metadata").write_bytes(_dotted_global_pickle(module, name, "touch PWNED"))
    _fix_manifest(ck, ".metadata")
    with pytest.raises(od.CheckpointCorrupt, match=rf"{module}\.{name} is not allowed"):
        rt.load(ck)
    assert not (tmp_path / "PWNED").exists()


def test_other_names_of_dcp_modules_are_refused(tmp_path):
    import io
    import pickle

    for module, name in [("torch.distributed.checkpoint.filesystem", "FileSystemWriter"),
                         ("torch.distributed.checkpoint", "save"),
                         ("torch.distributed.checkpoint.filesystem", "os")]:
        blob = b"\x80\x04" + _str(module) + _str(name) + b"\x93."
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            cf._MetadataUnpickler(io.BytesIO(blob)).load()
