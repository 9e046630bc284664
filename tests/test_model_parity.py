"""Every family's logits match transformers on import and export (fp32, max abs diff < 1e-4)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import maxdpo
from maxdpo.checkpoint.safetensors_io import SafetensorsFile
from maxdpo.models.registry import get_family
from maxdpo.models.spec import Execution
from maxdpo.models.transformer import abstract_model
from hf_models import FAMILIES, LLAMA3_ROPE, hf_logits, tiny_hf, tiny_llama

TOL = 1e-4


def _ids(batch=2, seq=40, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def _max_diff(model, hf, ids, mask=None):
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = hf_logits(hf, ids, mask)
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    return np.abs(ours[real] - theirs[real]).max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(tmp_path, family):
    hf = tiny_hf(tmp_path, family)
    model = maxdpo.load_pretrained(tmp_path)
    assert model.spec.family == family
    ids = _ids()
    assert _max_diff(model, hf, ids) < TOL
    mask = np.ones_like(ids)
    mask[1, 23:] = 0  # right padding, as maxdpo batches are
    assert _max_diff(model, hf, ids, mask) < TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers(tmp_path, family):
    hf = tiny_hf(tmp_path / "src", family)
    model = maxdpo.load_pretrained(tmp_path / "src")
    maxdpo.save_pretrained(model, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(SafetensorsFile(tmp_path / "src" / "model.safetensors").keys())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    ids = _ids(seed=3)
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() < TOL
    assert _max_diff(maxdpo.load_pretrained(tmp_path / "out"), hf, ids) < TOL


@pytest.mark.parametrize("family,change", [
    ("mistral", {"sliding_window": None}),
    ("gemma2", {"attn_logit_softcap": None}),
    ("gemma2", {"final_logit_softcap": None}),
    ("gemma2", {"layer_types": None}),
    ("gemma", {"scale_embeddings": False}),
    ("mixtral", {"num_experts_per_tok": 1}),
])
def test_family_features_change_the_logits(tmp_path, family, change):
    """The parity tests can fail: dropping a family's feature moves the logits far past the tolerance."""
    hf = tiny_hf(tmp_path, family)
    model = maxdpo.load_pretrained(tmp_path)
    changed = nnx.merge(abstract_model(model.spec.replace(**change))[0], nnx.state(model))
    assert _max_diff(model, hf, _ids()) < TOL
    assert _max_diff(changed, hf, _ids()) > 100 * TOL


def test_mixtral_router_aux_loss_matches_transformers(tmp_path):
    hf = tiny_hf(tmp_path, "mixtral")
    ids = _ids()
    mask = np.ones_like(ids)
    mask[0, 30:] = 0
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    for impl in ("dense", "ragged"):
        logits, aux = maxdpo.load_pretrained(tmp_path, moe_impl=impl).forward(ids, attention_mask=mask)
        assert abs(float(aux) - float(theirs.aux_loss)) < 1e-5
        real = mask.astype(bool)
        assert np.abs(np.asarray(logits)[real] - theirs.logits.numpy()[real]).max() < TOL


@pytest.mark.parametrize("family", ["gemma2", "mixtral"])
def test_unscanned_equals_scanned(tmp_path, family):
    tiny_hf(tmp_path, family, num_hidden_layers=5)  # gemma2: two scanned (sliding, global) groups + one more
    ids = _ids()
    scanned = maxdpo.load_pretrained(tmp_path)(ids)
    looped = maxdpo.load_pretrained(tmp_path, scan_layers=False, remat="full")(ids)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count(tmp_path, family):
    hf = tiny_hf(tmp_path, family)
    assert maxdpo.load_pretrained(tmp_path).spec.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("tied,rope_scaling", [(False, None), (True, LLAMA3_ROPE)])
def test_llama_tied_and_rope_variants(tmp_path, tied, rope_scaling):
    hf = tiny_llama(tmp_path, tie_word_embeddings=tied, rope_scaling=rope_scaling)
    assert _max_diff(maxdpo.load_pretrained(tmp_path), hf, _ids()) < TOL


def test_legacy_config_spelling(tmp_path):
    """A config.json with top-level rope_theta/rope_scaling (older hub checkpoints) reads the same."""
    hf = tiny_llama(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    config_file.write_text(json.dumps(config))
    assert _max_diff(maxdpo.load_pretrained(tmp_path), hf, _ids()) < TOL


def test_legacy_gemma_gelu_means_tanh(tmp_path):
    """Gemma hub configs say hidden_act "gelu"; transformers (and maxdpo) read it as the tanh approximation."""
    hf = tiny_hf(tmp_path, "gemma")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_act": "gelu"}))
    model = maxdpo.load_pretrained(tmp_path)
    assert model.spec.hidden_act == "gelu_pytorch_tanh"
    assert _max_diff(model, hf, _ids()) < TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_size_default_architecture_traces_without_allocating(family):
    """The hub-size default (e.g. Mixtral-8x7B, 46.7B parameters) builds and traces abstractly."""
    spec = get_family(family).default_spec
    graphdef, abstract, _ = abstract_model(spec, Execution(moe_impl="ragged", remat="full"))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract)) == spec.num_params()

    def forward(params, ids):
        return nnx.merge(graphdef, params).forward(ids)

    logits, aux = jax.eval_shape(forward, abstract, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    assert logits.shape == (1, 16, spec.vocab_size) and aux.shape == ()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_error_is_that_of_transformers_bfloat16(tmp_path, family):
    """In bf16 (params and compute) maxdpo strays from the fp32 logits no further than transformers does."""
    hf = tiny_hf(tmp_path, family)
    ids = _ids()
    exact = hf_logits(hf, ids)
    ours = np.asarray(maxdpo.load_pretrained(tmp_path, dtype="bfloat16", param_dtype="bfloat16")(ids))
    theirs = hf_logits(hf.to(torch.bfloat16), ids)
    assert np.abs(ours - exact).max() <= 1.5 * np.abs(theirs - exact).max() + 1e-3


def test_gemma2_export_writes_the_layer_pattern_the_model_ran(tmp_path):
    """layer_types=None slides every layer; the exported config.json must say so, not Gemma-2's default."""
    tiny_hf(tmp_path / "src", "gemma2")
    model = maxdpo.load_pretrained(tmp_path / "src")
    all_sliding = nnx.merge(abstract_model(model.spec.replace(layer_types=None))[0], nnx.state(model))
    maxdpo.save_pretrained(all_sliding, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == ["sliding_attention"] * model.spec.num_layers
    ids = _ids()
    np.testing.assert_allclose(np.asarray(maxdpo.load_pretrained(tmp_path / "out")(ids)),
                               np.asarray(all_sliding(ids)), atol=1e-5)
