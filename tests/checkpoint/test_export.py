"""rt.export → safetensors (transformers layout) → od.load_weights / from_pretrained."""

import json

import pytest
import torch
from safetensors import safe_open

import overdrive as od
from tests.helpers import require

from ckpt_util import make_model, manual_runtime

X = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _keys(directory):
    keys = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys += list(h.keys())
    return sorted(keys)


def test_export_single_file_then_load_into_fresh_model(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex")
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["model.safetensors"]
    assert _keys(tmp_path / "ex") == sorted(model.state_dict())
    fresh = make_model(2, seed=9)
    assert not torch.equal(fresh(X).logits, model(X).logits)
    od.load_weights(fresh, tmp_path / "ex")
    assert torch.equal(fresh(X).logits, model(X).logits)


def test_sharded_export_index_and_shard_size(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex", max_shard_size="20KB")
    index = json.loads((tmp_path / "ex" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "ex").glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards[0] == f"model-00001-of-{n:05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    for name in shards:  # a shard only exceeds the limit when one tensor alone does
        with safe_open(str(tmp_path / "ex" / name), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * 4 for k in h.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    fresh = make_model(2, seed=9)
    od.load_weights(fresh, tmp_path / "ex")
    assert torch.equal(fresh(X).logits, model(X).logits)


def test_export_dtype_and_meta_model(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "ex" / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("lm_head.weight").dtype == torch.bfloat16
    with torch.device("meta"):
        meta = make_model(2)
    od.load_weights(meta, tmp_path / "ex")
    assert meta.lm_head.weight.device.type == "cpu" and meta.lm_head.weight.dtype == torch.float32
    assert torch.equal(meta.rope, model.rope)  # non-persistent buffer rebuilt by init_weights
    torch.testing.assert_close(meta(X).logits, model(X).logits, atol=0.05, rtol=0.05)


def test_tied_weights_saved_once(tmp_path):
    model = make_model(2, seed=0, tie_embeddings=True)
    manual_runtime(model).export(tmp_path / "ex")
    assert "lm_head.weight" not in _keys(tmp_path / "ex")
    assert "embed_tokens.weight" in _keys(tmp_path / "ex")
    fresh = make_model(2, seed=3, tie_embeddings=True)
    od.load_weights(fresh, tmp_path / "ex")
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh(X).logits, model(X).logits)


def test_transformers_from_pretrained(tmp_path):
    transformers = require("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    manual_runtime(model).export(tmp_path / "ex", max_shard_size="30KB")
    assert (tmp_path / "ex" / "config.json").is_file()
    assert (tmp_path / "ex" / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in _keys(tmp_path / "ex")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ex").eval()
    assert torch.equal(loaded(X).logits, model(X).logits)


def test_index_pointing_outside_is_refused(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex", max_shard_size="20KB")
    index_path = tmp_path / "ex" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for bad in ("../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
        index["weight_map"]["lm_head.weight"] = bad
        index_path.write_text(json.dumps(index))
        with pytest.raises(od.CheckpointCorrupt, match="outside"):
            od.load_weights(make_model(2), tmp_path / "ex")


def test_load_weights_errors(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex")
    with pytest.raises(od.NotACheckpoint):
        od.load_weights(model, tmp_path)
    with pytest.raises(od.CheckpointMismatch, match=r"missing \(\d+\): layers\.2\."):
        od.load_weights(make_model(3), tmp_path / "ex")
    f = tmp_path / "ex" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(od.CheckpointCorrupt, match="truncated or corrupted"):
        od.load_weights(make_model(2), tmp_path / "ex")


# --------------------------------------------------------------------------- refused exports
from tests.helpers import assert_untouched, snapshot  # noqa: E402


def _sharded(tmp_path):
    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex", max_shard_size="20KB")
    return sorted((tmp_path / "ex").glob("model-*.safetensors"))


def _refused(directory, error, match):
    fresh = make_model(2, seed=9)
    before = snapshot(fresh)
    with pytest.raises(error, match=match):
        od.load_weights(fresh, directory)
    assert_untouched(fresh, before)


def test_a_missing_last_shard_loads_nothing(tmp_path):
    shards = _sharded(tmp_path)
    shards[-1].unlink()
    _refused(tmp_path / "ex", od.CheckpointCorrupt, rf"{shards[-1].name} is missing")


def test_a_wrong_shape_in_the_last_shard_loads_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    last = _sharded(tmp_path)[-1]
    tensors = load_file(str(last))
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(last))
    _refused(tmp_path / "ex", od.CheckpointMismatch, rf"{key}: export \[3, 3\], model")


@pytest.mark.parametrize("damage", ["truncate", "header", "header-length"])
def test_a_damaged_last_shard_loads_nothing(tmp_path, damage):
    last = _sharded(tmp_path)[-1]
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "header":
        data[12:20] = b"\xff" * 8  # inside the JSON header
    else:
        data[:8] = (10**12).to_bytes(8, "little")
    last.write_bytes(bytes(data))
    _refused(tmp_path / "ex", od.CheckpointCorrupt, last.name)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_flipped_byte_is_caught_by_the_export_checksum(tmp_path, sharded):
    from safetensors import safe_open

    model = make_model(2, seed=0)
    manual_runtime(model).export(tmp_path / "ex", max_shard_size="20KB" if sharded else "5GB")
    last = sorted((tmp_path / "ex").glob("model*.safetensors"))[-1]
    with safe_open(str(last), framework="pt") as h:
        assert set(json.loads(h.metadata()["overdrive.crc32"])) == set(h.keys())
    data = bytearray(last.read_bytes())
    data[-3] ^= 0x01  # a weight's byte: safetensors itself cannot notice
    last.write_bytes(bytes(data))
    _refused(tmp_path / "ex", od.CheckpointCorrupt, r"differ from the crc32 written at export")


def test_exports_without_a_checksum_still_load(tmp_path):
    from safetensors.torch import save_file

    model = make_model(2, seed=0)
    (tmp_path / "plain").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "plain" / "model.safetensors"))
    fresh = make_model(2, seed=9)
    od.load_weights(fresh, tmp_path / "plain")
    assert torch.equal(fresh(X).logits, model(X).logits)


@pytest.mark.parametrize("kind", ["fifo", "index-fifo"])
def test_a_fifo_in_an_export_is_not_opened(tmp_path, kind):
    import os
    import signal

    shards = _sharded(tmp_path)
    target = shards[-1] if kind == "fifo" else tmp_path / "ex" / "model.safetensors.index.json"
    target.unlink()
    os.mkfifo(target)
    signal.alarm(20)  # fail, rather than hang, if the open blocks
    try:
        _refused(tmp_path / "ex", od.CheckpointCorrupt, "not a regular file")
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("doc", ["[]", "null", '{"weight_map": []}', '{"weight_map": {"a": 1}}'])
def test_a_malformed_index_is_refused(tmp_path, doc):
    _sharded(tmp_path)
    (tmp_path / "ex" / "model.safetensors.index.json").write_text(doc)
    _refused(tmp_path / "ex", od.CheckpointCorrupt, "not a valid index")
