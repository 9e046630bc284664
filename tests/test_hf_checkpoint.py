"""Bad HF checkpoints stop with a CheckpointError that names the tensor and the file."""
import json

import numpy as np
import pytest

import maxdpo
from hf_models import tiny_hf
from maxdpo.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

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
