"""Llama logits match transformers on import and export (fp32, max abs diff < 1e-4)."""
import json

import numpy as np
import pytest
import transformers

import maxdpo
from hf_models import LLAMA3_ROPE, hf_logits, tiny_llama

TOL = 1e-4


def _ids(batch=2, seq=40, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


@pytest.mark.parametrize("tied,rope_scaling", [(False, LLAMA3_ROPE), (True, None)])
def test_import_matches_transformers(tmp_path, tied, rope_scaling):
    hf = tiny_llama(tmp_path, tie_word_embeddings=tied, rope_scaling=rope_scaling)
    ids = _ids()
    model = maxdpo.load_pretrained(tmp_path)
    ours = np.asarray(model(ids))
    assert np.abs(ours - hf_logits(hf, ids)).max() < TOL


def test_padding_mask_matches_transformers(tmp_path):
    hf = tiny_llama(tmp_path)
    ids = _ids(seq=24)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # right padding, as maxdpo batches are
    model = maxdpo.load_pretrained(tmp_path)
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < TOL


def test_unscanned_equals_scanned(tmp_path):
    tiny_llama(tmp_path)
    ids = _ids()
    scanned = maxdpo.load_pretrained(tmp_path)(ids)
    looped = maxdpo.load_pretrained(tmp_path, scan_layers=False, remat="full")(ids)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_export_loads_in_transformers(tmp_path, shard_bytes):
    hf = tiny_llama(tmp_path / "src")
    model = maxdpo.load_pretrained(tmp_path / "src")
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    maxdpo.save_pretrained(model, tmp_path / "out", **kwargs)
    if shard_bytes:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(seed=3)
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() < TOL
    assert np.abs(np.asarray(maxdpo.load_pretrained(tmp_path / "out")(ids)) - hf_logits(hf, ids)).max() < TOL


def test_legacy_config_spelling(tmp_path):
    """A config.json with top-level rope_theta/rope_scaling (older hub checkpoints) reads the same."""
    hf = tiny_llama(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    config_file.write_text(json.dumps(config))
    ids = _ids()
    assert np.abs(np.asarray(maxdpo.load_pretrained(tmp_path)(ids)) - hf_logits(hf, ids)).max() < TOL


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count(tmp_path, tied):
    hf = tiny_llama(tmp_path, tie_word_embeddings=tied)
    model = maxdpo.load_pretrained(tmp_path)
    assert model.spec.num_params() == sum(p.numel() for p in hf.parameters())
