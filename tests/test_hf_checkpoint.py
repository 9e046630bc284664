"""HF checkpoint reading: bad input names the tensor and file; sharded loading reads only what it places."""
import json

import jax
import numpy as np
import pytest

import maxdpo
from hf_models import tiny_hf
from maxdpo.checkpoint.hf import CheckpointReader, load_params, load_params_sharded, spec_from_pretrained
from maxdpo.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from maxdpo.configure import load_config
from maxdpo.program import build_train_program
from maxdpo.sharding import make_mesh

EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture
def mixtral_dir(tmp_path):
    tiny_hf(tmp_path, "mixtral")
    return tmp_path


def _rewrite(folder, edit):
    file = folder / "model.safetensors"
    source = SafetensorsFile(file)
    tensors = [(name, np.array(source.get(name))) for name in source.keys()]
    write_safetensors(file, edit(tensors), {"format": "pt"})


def test_unsupported_model_type(mixtral_dir):
    config = mixtral_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'gpt2' in .*config.json"):
        maxdpo.load_pretrained(mixtral_dir)


def test_config_missing_a_family_key(mixtral_dir):
    config = mixtral_dir / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "num_local_experts"}))
    with pytest.raises(CheckpointError, match=r"config.json lacks the key 'num_local_experts'"):
        maxdpo.load_pretrained(mixtral_dir)


def test_missing_tensor(mixtral_dir):
    _rewrite(mixtral_dir, lambda tensors: [(n, t) for n, t in tensors if n != EXPERT])
    with pytest.raises(CheckpointError, match=rf"tensor '{EXPERT}' is missing from the checkpoint in {mixtral_dir}"):
        maxdpo.load_pretrained(mixtral_dir)


def test_wrong_shape(mixtral_dir):
    _rewrite(mixtral_dir, lambda tensors: [(n, t[:, :-1] if n == EXPERT else t) for n, t in tensors])
    with pytest.raises(CheckpointError, match=rf"tensor '{EXPERT}' in .*model.safetensors has shape \(48, 79\)"):
        maxdpo.load_pretrained(mixtral_dir)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_file(mixtral_dir, damage):
    file = mixtral_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    pattern = "is truncated or its offsets are corrupt" if damage == "truncate" else "corrupt or unreadable safetensors"
    with pytest.raises(CheckpointError) as raised:
        maxdpo.load_pretrained(mixtral_dir)
    assert str(file) in str(raised.value) and pattern in str(raised.value)


def test_missing_shard_named_in_index(tmp_path):
    tiny_hf(tmp_path / "src", "gemma")
    maxdpo.save_pretrained(maxdpo.load_pretrained(tmp_path / "src"), tmp_path / "out", max_shard_bytes=30_000)
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard} named in .*index.json does not exist"):
        maxdpo.load_pretrained(tmp_path / "out")


def test_sharded_load_equals_host_load_and_reads_only_needed_tensors(tmp_path):
    mixtral_dir = tmp_path
    tiny_hf(mixtral_dir, "mixtral", num_local_experts=4)
    family, spec = spec_from_pretrained(mixtral_dir)
    cfg = load_config(None, ["mesh.data=1", "mesh.expert=2", "mesh.tensor=2", "mesh.fsdp=2", "model.family=mixtral",
                             f"model.path={mixtral_dir}", "model.overrides=null"])
    shardings = build_train_program(cfg, make_mesh(cfg.mesh), total_steps=1).param_shardings
    sharded = load_params_sharded(mixtral_dir, spec, family, shardings, np.float32)
    host = load_params(mixtral_dir, spec, family)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), host)
    assert sharded["layers"]["mlp"]["gate_proj"].sharding.spec[1] == ("expert", "fsdp")  # 4 experts, 1 a block

    reader = CheckpointReader(mixtral_dir, spec, family, np.float32)
    entry = next(e for e in family.param_entries(spec) if e.path == ("layers", "mlp", "down_proj"))
    read = []
    original = reader.read
    reader.read = lambda entry, name: read.append(name) or original(entry, name)
    # layers 0-1 x experts 1-2, first half of the mlp dim: 4 tensors, each read once for the two blocks
    blocks = reader.read_blocks(entry, [(slice(0, 2), slice(1, 3), slice(0, 40), slice(None)),
                                        (slice(0, 2), slice(1, 3), slice(40, 80), slice(None))])
    assert sorted(read) == sorted(f"model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"
                                  for l in (0, 1) for e in (1, 2))
    np.testing.assert_array_equal(np.concatenate(blocks, axis=2), host["layers"]["mlp"]["down_proj"][0:2, 1:3])
