"""Nothing in a checkpoint directory runs code or reads outside the directory."""

import json

import pytest
import torch

import overdrive as od
from overdrive.runtime import checkpoint_files as cf

from ckpt_util import trained_runtime


def _saved(tmp_path):
    rt, _ = trained_runtime()
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


def _repoint_index(ck, relative_path):
    """Rewrite .metadata so every tensor of __0_0.distcp is read from ``relative_path``."""
    import pickle

    with open(ck / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own test file: plain pickle is fine here
    for info in metadata.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = relative_path
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    rt, ck = _saved(tmp_path)
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    (tmp_path / "outside.distcp").write_bytes((ck / "__0_0.distcp").read_bytes())
    (ck / "__0_0.distcp").unlink()
    _repoint_index(ck, "../outside.distcp")
    manifest = json.loads((ck / cf.MANIFEST).read_text())
    entry = manifest["files"].pop("__0_0.distcp")
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))
    _fix_manifest(ck, ".metadata")
    with pytest.raises(od.CheckpointCorrupt, match=r"'\.\./outside\.distcp', which is outside"):
        rt.load(ck)
    manifest = json.loads((ck / cf.MANIFEST).read_text())  # listing it does not help
    manifest["files"]["../outside.distcp"] = entry
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(od.CheckpointCorrupt, match=r"outside the checkpoint: '\.\./outside"):
        rt.load(ck)
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_index_naming_a_file_not_in_the_manifest_is_refused(tmp_path):
    rt, ck = _saved(tmp_path)
    (ck / "extra.distcp").write_bytes((ck / "__0_0.distcp").read_bytes())
    _repoint_index(ck, "extra.distcp")
    _fix_manifest(ck, ".metadata")
    with pytest.raises(od.CheckpointCorrupt, match=r"'extra\.distcp', which is not in .*manifest"):
        rt.load(ck)


def test_shard_symlinked_outside_is_refused(tmp_path):
    rt, ck = _saved(tmp_path)
    outside = tmp_path / "outside.distcp"
    (ck / "__0_0.distcp").rename(outside)
    (ck / "__0_0.distcp").symlink_to(outside)  # same bytes: size and crc32 still match
    with pytest.raises(od.CheckpointCorrupt, match=r"__0_0\.distcp.*which is outside"):
        rt.load(ck)


def test_index_spanning_past_the_file_is_refused(tmp_path):
    import pickle

    rt, ck = _saved(tmp_path)
    with open(ck / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    info = next(i for i in metadata.storage_data.values() if i.relative_path == "__0_0.distcp")
    info.length = 10**9
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _fix_manifest(ck, ".metadata")
    with pytest.raises(od.CheckpointCorrupt, match=rf"spans bytes {info.offset}\+1000000000 of "
                                                   r"'__0_0\.distcp'"):
        rt.load(ck)


@pytest.mark.parametrize("name", [".metadata", "state.pt", "rank-0.pt"])
def test_files_missing_from_the_manifest_are_not_read(tmp_path, name):
    rt, ck = _saved(tmp_path)
    manifest = json.loads((ck / cf.MANIFEST).read_text())
    del manifest["files"][name]  # so it would never be verified
    (ck / cf.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(od.CheckpointCorrupt, match=rf"{name} not listed in manifest\.json"):
        rt.load(ck)
