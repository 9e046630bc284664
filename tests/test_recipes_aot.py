"""Seed recipes compiled ahead of time (XLA:GPU's memory plan for H100 meshes, libtpu for TPU topologies): the tiny
twins' per-device memory adds up and fits, a step too big for the chip is reported as not fitting, and the
Notux recipe fits its own 8 x H100. (Split from test_recipes.py so the two spread over test workers.)"""
import importlib.util
import json

import pytest

from maxdpo import compile as aot
from maxdpo.topology import parse_topology
from test_recipes import RECIPES

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda13") is None,
                                       reason="jax-cuda13-plugin is not installed")


# Parameters of the tiny twins by hand: per layer q, k, v, o + the MLP (x experts, + router) + 2 norms; then
# the embedding, the final norm and an untied lm_head (Gemma ties it).
MIXTRAL_PARAMS = 2 * (64 * 16 * (4 + 2 + 2 + 4) + 4 * 3 * 64 * 96 + 64 * 4 + 2 * 64) + 64 * 64 + 64 + 64 * 64
LLAMA_PARAMS = 4 * (64 * 16 * (4 + 2 + 2 + 4) + 3 * 64 * 128 + 2 * 64) + 64 * 64 + 64 + 64 * 64
GEMMA_LAYER = 64 * 16 * (4 + 1 + 1 + 4) + 3 * 64 * 128 + 2 * 64
TINY_PARAMS = {"mixtral_8x7b_instruct_dpo": MIXTRAL_PARAMS, "notux_8x7b_dpo": MIXTRAL_PARAMS,
               "smaug_mixtral_dpop": MIXTRAL_PARAMS, "llama3_8b_two_stage_dpo": LLAMA_PARAMS,
               "gemma_7b_sft_dpo": 4 * GEMMA_LAYER + 64 * 64 + 64}
H100_GB = 80


def _check_memory(report, params):
    """The per-device numbers add up, the fit verdict follows from them, and the arguments hold at least this
    device's FSDP shard (over 4) of the policy (and reference) weights but far less than those weights and
    Adam's two moments replicated (plus this device's eighth of the batch, at most 6 int32s a token)."""
    memory = report["gb_per_device"]
    assert memory["total"] == pytest.approx(
        memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"], rel=1e-9)
    assert memory["aliased"] <= min(memory["arguments"], memory["outputs"]) and memory["temporaries"] > 0
    assert report["capacity_gb_per_device"] == H100_GB and report["fits"] == (memory["total"] <= H100_GB)
    assert report["params_billion"] * 1e9 == params
    size = {"float32": 4, "bfloat16": 2}[report["param_dtype"]]
    weights = size * params * (2 if report["reference"] == "model" else 1)  # bytes, unsharded
    batch = report["rows"] * 2 * report["seq"] * 6 * 4 / 8
    assert weights / 4 <= memory["arguments"] * 1e9 < (weights + 2 * 4 * params) / 2 + batch


@pytest.mark.gpu_aot
@needs_cuda_plugin
@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_twin_compiles_for_an_h100_mesh(tmp_path, recipe):
    out = tmp_path / "report.json"
    assert aot.main([f"tiny_{recipe}.yaml", "--topology", "h100:8", "mesh.fsdp=4", "mesh.data=2",
                     "--json", str(out)]) == 0
    reports = json.loads(out.read_text())
    assert len(reports) == (2 if recipe in ("llama3_8b_two_stage_dpo", "gemma_7b_sft_dpo") else 1)
    assert all(r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4} for r in reports)
    assert [r["reference"] for r in reports] == {"llama3_8b_two_stage_dpo": ["model", "model"],
                                                 "gemma_7b_sft_dpo": ["none", "model"]}.get(recipe, ["model"])
    for report in reports:
        _check_memory(report, TINY_PARAMS[recipe])
        assert report["fits"] and report["gb_per_device"]["total"] < 1  # a tiny model: well under a GB


@pytest.mark.gpu_aot
@needs_cuda_plugin
def test_a_step_too_big_for_the_chip_does_not_fit(tmp_path):
    """The same tiny twin at 8k tokens a sequence: the XLA attention's [T, T] scores are 4 pairs a device x 2
    sequences x 4 heads x 8192^2 x 4 bytes = 8.6 GB a copy, and the step holds many (2 layers, policy and
    reference, forward and backward): past the H100's 80 GB, which the report and the exit status say."""
    out = tmp_path / "report.json"
    assert aot.main(["tiny_notux_8x7b_dpo.yaml", "--topology", "h100:8", "mesh.fsdp=4", "mesh.data=2",
                     "data.max_length=8192", "model.overrides.max_position_embeddings=8192",
                     "--json", str(out)]) == 1
    (report,) = json.loads(out.read_text())
    _check_memory(report, MIXTRAL_PARAMS)
    assert not report["fits"] and report["gb_per_device"]["temporaries"] > H100_GB


@pytest.mark.tpu_aot
@needs_libtpu
def test_tiny_twin_compiles_for_tpu_and_sizes_parse(tmp_path):
    out = tmp_path / "report.json"
    assert aot.main(["tiny_notux_8x7b_dpo.yaml", "--topology", "v5p-8", "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())
    assert report["devices"] == 4 and report["mesh"] == {"fsdp": 4} and report["gb_per_device"]["total"] > 0
    assert parse_topology("v5p-64").tpu_name == "v5p:2x4x4"
    assert parse_topology("v5p-8").tpu_name == "v5p:2x2x1"
    assert parse_topology("v5e-16").tpu_name == "v5e:4x4"


@pytest.mark.tpu_aot
@needs_libtpu
def test_a_program_libtpu_refuses_is_reported_as_not_fitting(tmp_path, capsys):
    """libtpu refuses to compile a program past the chip's memory (where XLA:GPU plans it and says how much):
    the report says it does not fit, with the compiler's sizes, and the exit status is 1."""
    out = tmp_path / "report.json"
    assert aot.main(["tiny_notux_8x7b_dpo.yaml", "--topology", "v5e-4", "data.max_length=16384",
                     "model.overrides.max_position_embeddings=16384", "--json", str(out)]) == 1
    (report,) = json.loads(out.read_text())
    assert not report["fits"] and "RESOURCE_EXHAUSTED" in report["compiler_refused"]
    assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in capsys.readouterr().out


@pytest.mark.slow
@needs_libtpu
def test_mixtral_dpo_with_reference_fits_a_v5p_16():
    assert aot.main(["notux_8x7b_dpo.yaml", "--topology", "v5p-16"]) == 0


@pytest.mark.slow  # a full-size compile (Mixtral-8x7B on 8 GPUs): `pytest -m slow`
@pytest.mark.gpu_aot
@needs_cuda_plugin
def test_the_notux_recipe_fits_its_own_8_h100(tmp_path):
    """The seed's hardware: Mixtral-8x7B DPO with the reference on device, the card's 64 pairs x 1024, on
    8 x H100 80GB within 76 GB a GPU in XLA:GPU's plan (bf16 weights and moments, docs/recipes.md)."""
    out = tmp_path / "report.json"
    assert aot.main(["notux_8x7b_dpo.yaml", "--topology", "h100:8", "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())
    assert (report["rows"], report["seq"], report["reference"]) == (64, 1024, "model")
    assert report["gb_per_device"]["total"] <= 76


@pytest.mark.gpu_aot
@needs_cuda_plugin
def test_a_micro_batch_the_topology_cannot_split_is_raised_to_one_it_can(tmp_path, capsys):
    """The notux twin's micro batch (32) on 64 GPUs: compile picks 64 and says so; the same micro batch given
    on the command line stays an error naming it."""
    out = tmp_path / "report.json"
    assert aot.main(["tiny_notux_8x7b_dpo.yaml", "--topology", "h100:8x8", "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())
    assert report["devices"] == 64 and report["micro_batch"] == 64 and report["rows"] == 64
    assert "using trainer.micro_batch_size=64" in capsys.readouterr().out
    assert aot.main(["tiny_notux_8x7b_dpo.yaml", "--topology", "h100:8x8", "trainer.micro_batch_size=32"]) == 2
    assert "micro batch of 32 rows" in capsys.readouterr().err
