"""tools/slerp_merge.py: SLERP maths, mergekit's per-layer and per-filter t, whole merges that transformers loads."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_models import tiny_hf

from tools import slerp_merge as sm

TOOL = Path(sm.__file__)

RECIPE = """\
merge_method: slerp
base_model: A
slices:
  - sources:
      - {model: A, layer_range: [0, 3]}
      - {model: B, layer_range: [0, 3]}
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.9]
    - filter: mlp
      value: [0.9, 0.5, 0.3, 0.7, 0.1]
    - value: [0.2, 0.6]
dtype: float32
"""


def reference_slerp(t: float, v0, v1) -> np.ndarray:
    """The closed form in float64: lerp when the vectors are within arccos(0.9995) of (anti)parallel."""
    a, b = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def recipe_t(name: str) -> float:
    """RECIPE's t for the 3-layer tiny Gemma, by hand: layers sit at positions 0, 1/2, 1 of each gradient."""
    if name == "model.embed_tokens.weight":
        return 0.2
    if name == "model.norm.weight":
        return 0.6
    layer = int(name.split(".")[2])
    for key, values in {"self_attn": [0.1, 0.5, 0.9], "mlp": [0.9, 0.3, 0.1]}.items():
        if key in name:
            return values[layer]
    return [0.2, 0.4, 0.6][layer]


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_unit_vectors_turn_by_t_times_the_angle(t):
    theta = 1.2
    out = sm.slerp(t, np.array([1.0, 0.0], np.float32), np.array([math.cos(theta), math.sin(theta)], np.float32))
    np.testing.assert_allclose(out, [math.cos(t * theta), math.sin(t * theta)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_non_unit_tensors_follow_the_sine_formula(t):
    rng = np.random.default_rng(0)
    v0, v1 = rng.normal(size=(3, 5)).astype(np.float32), 3 * rng.normal(size=(3, 5)).astype(np.float32)
    out = sm.slerp(t, v0, v1)
    assert out.shape == (3, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_slerp(t, v0, v1), rtol=1e-5, atol=1e-6)
    if 0 < t < 1:  # far from lerp, so the formula is really tested
        assert np.abs(out - ((1 - t) * v0 + t * v1)).max() > 0.1


def test_endpoints_are_the_inputs_exactly():
    rng = np.random.default_rng(1)
    v0, v1 = (rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16) for _ in range(2))
    np.testing.assert_array_equal(sm.merge_tensor("w", 0.0, v0, v1, v0.dtype), v0)
    np.testing.assert_array_equal(sm.merge_tensor("w", 1.0, v0, v1, v0.dtype), v1)
    v0, v1 = rng.normal(size=7), rng.normal(size=7)  # float64 stays float64
    assert sm.slerp(0.4, v0, v1).dtype == np.float64
    np.testing.assert_allclose(sm.slerp(0.4, v0, v1), reference_slerp(0.4, v0, v1), rtol=1e-12)


def test_nearly_parallel_vectors_are_lerped_exactly():
    rng = np.random.default_rng(2)
    v0 = rng.normal(size=100).astype(np.float32)
    v1 = 2 * v0 + 0.01 * rng.normal(size=100).astype(np.float32)
    cos = np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1))
    assert 0.9995 < cos < 1
    np.testing.assert_array_equal(sm.slerp(0.3, v0, v1), 0.7 * v0 + np.float32(0.3) * v1)


def test_antipodal_and_zero_vectors_give_no_nan():
    v = np.array([1.0, -2.0, 3.0], np.float32)
    np.testing.assert_allclose(sm.slerp(0.5, v, -v), 0, atol=1e-7)
    np.testing.assert_allclose(sm.slerp(0.25, v, -v), 0.5 * v, rtol=1e-6)
    zero = np.zeros(3, np.float32)
    np.testing.assert_allclose(sm.slerp(0.25, zero, v), 0.25 * v, rtol=1e-6)
    np.testing.assert_array_equal(sm.slerp(0.5, zero, zero), zero)


def test_integer_tensors_must_agree():
    ids = np.arange(4, dtype=np.int64)
    np.testing.assert_array_equal(sm.merge_tensor("ids", 0.5, ids, ids, ids.dtype), ids)
    with pytest.raises(sm.MergeError, match="'ids'.*differs"):
        sm.merge_tensor("ids", 0.5, ids, ids + 1, ids.dtype)


def test_gradients_and_filters_pick_t_per_tensor():
    setting = sm.parse_t([{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                          {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}])
    cases = {  # 9 layers: layer i sits at i/8, i.e. at anchor index i/2
        "model.layers.0.self_attn.q_proj.weight": 0.0, "model.layers.1.self_attn.k_proj.weight": 0.25,
        "model.layers.3.self_attn.o_proj.weight": 0.4, "model.layers.8.self_attn.v_proj.weight": 1.0,
        "model.layers.1.mlp.up_proj.weight": 0.75, "model.layers.5.mlp.down_proj.weight": 0.5,
        "model.layers.7.mlp.gate_proj.weight": 0.15, "model.layers.4.input_layernorm.weight": 0.5,
        "model.embed_tokens.weight": 0.5, "model.norm.weight": 0.5, "lm_head.weight": 0.5,
    }
    for name, expected in cases.items():
        assert sm.t_for(name, setting, 9) == pytest.approx(expected), name
    gradient = sm.parse_t([0.2, 0.6, 1.0])  # non-layer tensors: embeddings at position 0, the others at 1
    assert sm.t_for("model.embed_tokens.weight", gradient, 9) == pytest.approx(0.2)
    assert sm.t_for("model.norm.weight", gradient, 9) == pytest.approx(1.0)
    assert sm.t_for("lm_head.weight", gradient, 9) == pytest.approx(1.0)
    assert sm.t_for("model.layers.2.mlp.up_proj.weight", gradient, 9) == pytest.approx(0.4)
    assert sm.t_for("model.layers.0.mlp.up_proj.weight", gradient, 1) == pytest.approx(1.0)  # one layer: position 1
    assert sm.t_for("model.layers.0.mlp.up_proj.weight", sm.parse_t(0.3), None) == 0.3  # scalars need no depth


def test_first_matching_entry_wins():
    setting = sm.parse_t([{"value": 0.5}, {"filter": "mlp", "value": 1}])
    assert sm.t_for("model.layers.0.mlp.up_proj.weight", setting, 2) == 0.5
    setting = sm.parse_t([{"filter": "mlp", "value": 1}, {"filter": "*", "value": 0.2}])
    assert sm.t_for("model.layers.0.mlp.up_proj.weight", setting, 2) == 1.0
    assert sm.t_for("model.norm.weight", setting, 2) == 0.2
    only_mlp = sm.parse_t({"filter": "mlp", "value": 0.3})
    with pytest.raises(sm.MergeError, match="no entry of t matches tensor 'model.norm.weight'"):
        sm.t_for("model.norm.weight", only_mlp, 2)


@pytest.mark.parametrize("raw,message", [
    (1.5, r"outside \[0, 1\]"), ([0, -0.1], r"outside \[0, 1\]"), ([], "non-empty list"), ("half", "number"),
    (True, "number"), ([{"filter": "mlp"}], "must have a 'value'"), ([{"value": 0.5, "weight": 1}], "at most"),
    ([{"filter": 3, "value": 0.5}], "filter must be a string"), ([{"value": [0.5, 2]}], r"t\[0\].value"),
])
def test_bad_t_settings_are_named(raw, message):
    with pytest.raises(sm.MergeError, match=message):
        sm.parse_t(raw)


def test_layer_outside_the_config_is_an_error():
    gradient = sm.parse_t([0, 1])
    with pytest.raises(sm.MergeError, match="layer 4 but config.json has num_hidden_layers=4"):
        sm.t_for("model.layers.4.mlp.up_proj.weight", gradient, 4)
    with pytest.raises(sm.MergeError, match="no num_hidden_layers"):
        sm.t_for("model.layers.0.mlp.up_proj.weight", gradient, None)


def test_merge_config_yaml(tmp_path):
    good = tmp_path / "merge.yaml"
    good.write_text(RECIPE)
    assert sm.load_setting(good) == [("self_attn", [0.1, 0.9]), ("mlp", [0.9, 0.5, 0.3, 0.7, 0.1]),
                                     (None, [0.2, 0.6])]
    bad = {"syntax.yaml": "parameters: {t: [0, 1", "no_t.yaml": "parameters: {weight: 1}\n",
           "ties.yaml": "merge_method: ties\nparameters: {t: 0.5}\n",
           "slices.yaml": "slices: [{sources: [], parameters: {t: 0.5}}]\nparameters: {t: 0.5}\n",
           "range.yaml": "parameters: {t: [{filter: mlp, value: 3}]}\n"}
    messages = ["cannot read merge config", "no top-level 'parameters", "merge_method 'ties'", "slice-level",
                r"range.yaml: parameters.t\[0\].value = 3 lies outside"]
    for (file, text), message in zip(bad.items(), messages):
        (tmp_path / file).write_text(text)
        with pytest.raises(sm.MergeError, match=message):
            sm.load_setting(tmp_path / file)
    with pytest.raises(sm.MergeError, match="cannot read merge config"):
        sm.load_setting(tmp_path / "absent.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random Gemmas (the recipe's family) of one config, each saved to its own folder."""
    root = tmp_path_factory.mktemp("models")
    model_a, model_b = tiny_hf(root / "a", "gemma", seed=0), tiny_hf(root / "b", "gemma", seed=1)
    (root / "a" / "tokenizer.json").write_text('{"tiny": true}')
    return root, model_a.state_dict(), model_b.state_dict()


def check_merge(out: Path, state_a, state_b, t_of, dtype, rtol):
    """OUT loads in transformers with every weight in place, equal to the reference slerp, and runs."""
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = merged.state_dict()
    assert state.keys() == state_a.keys()
    for name, tensor in state.items():
        assert tensor.dtype == dtype, name
        if name == "lm_head.weight":  # tied to the embeddings, which are checked
            assert torch.equal(tensor, state["model.embed_tokens.weight"])
            continue
        expected = reference_slerp(t_of(name), state_a[name].numpy(), state_b[name].numpy())
        np.testing.assert_allclose(tensor.float().numpy(), expected, rtol=rtol, atol=1e-6, err_msg=name)
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor([[1, 5, 7, 9, 11]])).logits
    assert logits.shape == (1, 5, 97) and torch.isfinite(logits).all()


def test_merge_end_to_end_with_the_recipe_config(models, tmp_path):
    root, state_a, state_b = models
    config = tmp_path / "merge.yaml"
    config.write_text(RECIPE)
    assert sm.main([str(root / "a"), str(root / "b"), str(tmp_path / "out"), "--config", str(config)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]
    for copied in ("tokenizer.json", "generation_config.json"):
        assert (out / copied).read_bytes() == (root / "a" / copied).read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((root / "a" / "config.json").read_text())
    check_merge(out, state_a, state_b, recipe_t, torch.float32, rtol=1e-5)


def test_cli_with_sharded_input_and_output_in_bfloat16(models, tmp_path):
    root, state_a, state_b = models
    sharded = tmp_path / "a_sharded"
    transformers.AutoModelForCausalLM.from_pretrained(root / "a").save_pretrained(sharded, max_shard_size="60KB")
    assert len(json.loads((sharded / sm.INDEX_FILE).read_text())["weight_map"]) == len(state_a) - 1  # lm_head tied
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(TOOL), str(sharded), str(root / "b"), str(out), "--t", "0.3",
                    "--dtype", "bfloat16", "--max-shard-bytes", "30000"], check=True, capture_output=True)
    index = json.loads((out / sm.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    check_merge(out, state_a, state_b, lambda name: 0.3, torch.bfloat16, rtol=1e-2)


def test_mismatched_models_and_bad_flags_fail_clearly(models, tmp_path, capsys):
    root = models[0]
    tiny_hf(tmp_path / "wide", "gemma", seed=1, intermediate_size=64)
    tiny_hf(tmp_path / "short", "gemma", seed=1, num_hidden_layers=2)
    cases = [
        (tmp_path / "wide", "0.5", r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) in "),
        (tmp_path / "short", "0.5", r"tensor 'model\.layers\.2\.[\w.]+' of .* is missing from "),
        (root / "b", "1.5", r"--t = 1\.5 lies outside \[0, 1\]"),
    ]
    out = tmp_path / "out"
    for b, t, message in cases:
        assert sm.main([str(root / "a"), str(b), str(out), "--t", t]) == 1
        assert re.search(message, capsys.readouterr().err)
        assert not out.exists() or not any(out.iterdir())  # nothing written
    assert sm.main([str(root / "a"), str(root / "b"), str(root / "a"), "--t", "0.5"]) == 1
    assert "already holds weights" in capsys.readouterr().err
