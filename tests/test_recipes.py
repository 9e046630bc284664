"""Seed recipes: the full-size configs carry their cards' settings; their tiny twins train end to end
(multi-stage chaining, SFT -> DPO, partial freezing) and compile ahead of time for TPU and GPU meshes."""
import importlib.util
import json

import numpy as np
import pytest
import transformers

from maxdpo import compile as aot
from maxdpo import train
from maxdpo.checkpoint.safetensors_io import SafetensorsFile
from maxdpo.config import ConfigError
from maxdpo.configure import load_config
from maxdpo.stages import DONE_FILE, stage_configs
from maxdpo.topology import parse_topology

RECIPES = ["mixtral_8x7b_instruct_dpo", "notux_8x7b_dpo", "smaug_mixtral_dpop", "llama3_8b_two_stage_dpo",
           "gemma_7b_sft_dpo"]
QUICK = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda13") is None,
                                       reason="jax-cuda13-plugin is not installed")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(hf_dir):
    files = [SafetensorsFile(path) for path in sorted(hf_dir.glob("*.safetensors"))]
    return {name: np.asarray(file.get(name)) for file in files for name in file.keys()}


def test_full_configs_carry_their_cards_settings():
    notux = load_config("notux_8x7b_dpo.yaml")
    assert (notux.optimizer.learning_rate, notux.trainer.batch_size, notux.optimizer.b1, notux.optimizer.b2,
            notux.optimizer.eps, notux.optimizer.schedule, notux.optimizer.warmup_ratio, notux.trainer.epochs,
            notux.run.seed) == (5e-7, 64, 0.9, 0.999, 1e-8, "linear", 0.1, 1, 42)
    assert notux.model.family == load_config("mixtral_8x7b_instruct_dpo.yaml").model.family == "mixtral"
    assert load_config("mixtral_8x7b_instruct_dpo.yaml").data.chat_template == "mistral"
    smaug = load_config("smaug_mixtral_dpop.yaml")
    assert smaug.dpo.loss == "dpop" and smaug.model.path.endswith("Mixtral-8x7B-v0.1")  # the base model
    llama = stage_configs(load_config("llama3_8b_two_stage_dpo.yaml"))
    assert [cfg.data.chat_template for _, cfg in llama] == ["llama3", "llama3"]
    assert llama[1][1].model.path == f"{llama[0][0]}/hf" and llama[1][1].reference.path is None
    assert llama[0][1].data.system_prompt.startswith("Du bist")
    gemma = stage_configs(load_config("gemma_7b_sft_dpo.yaml"))
    assert [cfg.dpo.loss for _, cfg in gemma] == ["sft", "sigmoid"]
    assert gemma[0][1].data.chat_template == "vicuna" and gemma[1][1].freeze.trainable


def test_stage_errors_name_the_stage():
    with pytest.raises(ConfigError, match=r"stages\[1\]\.optimizer\.learning_rat"):
        stage_configs(load_config(None, ["stages=[{name: a}, {optimizer: {learning_rat: 1}}]"]))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.model\.path"):
        stage_configs(load_config(None, ["stages=[{name: a}, {model: {path: x}}]"]))


@pytest.mark.parametrize("recipe", ["mixtral_8x7b_instruct_dpo", "notux_8x7b_dpo", "smaug_mixtral_dpop"])
def test_tiny_twin_trains(tmp_path, recipe):
    run_dir = tmp_path / "run"
    assert train.main([f"tiny_{recipe}.yaml", f"run.output_dir={run_dir}", *QUICK]) == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2]  # eval_every=0: the final evaluation only
    assert all(np.isfinite(r["eval_loss"]) for r in evals)
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.model_type == "mixtral"


def test_two_stage_dpo_chains_policy_and_reference(tmp_path):
    """Stage 2 starts from stage 1's export and uses it as reference: with learning rate 0 its evaluation
    equals stage 1's final one, with zero rewards; a second invocation skips both finished stages."""
    run_dir = tmp_path / "run"
    args = ["tiny_llama3_8b_two_stage_dpo.yaml", f"run.output_dir={run_dir}", *QUICK,
            "data.train=bundled:tiny/train.jsonl",
            "stages=[{name: first}, {name: second, optimizer: {learning_rate: 0.0}}]"]
    assert train.main(args) == 0
    first, second = (_rows(run_dir / name)[-1] for name in ("1_first", "2_second"))
    assert first["eval_rewards/margins"] != 0
    assert second["eval_logps/chosen"] == pytest.approx(first["eval_logps/chosen"], rel=1e-5)
    assert second["eval_rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    saved = load_config(str(run_dir / "2_second" / "config.yaml"))
    assert saved.model.path == str(run_dir / "1_first" / "hf") and saved.reference.path is None
    assert (run_dir / "1_first" / DONE_FILE).is_file() and (run_dir / "2_second" / DONE_FILE).is_file()
    before = (run_dir / "2_second" / "metrics.jsonl").read_text()
    assert train.main(args) == 0
    assert (run_dir / "2_second" / "metrics.jsonl").read_text() == before


def test_gemma_sft_then_dpo_with_laser_freezing(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["tiny_gemma_7b_sft_dpo.yaml", f"run.output_dir={run_dir}", *QUICK]) == 0
    sft_rows, dpo_rows = _rows(run_dir / "1_sft"), _rows(run_dir / "2_dpo")
    assert "rewards/chosen" not in sft_rows[0] and "logps/chosen" in sft_rows[0]
    assert "rewards/chosen" in dpo_rows[0]
    sft, dpo = _tensors(run_dir / "1_sft" / "hf"), _tensors(run_dir / "2_dpo" / "hf")
    for name in sft:  # freeze.trainable: only layers 2 and 3 move in the DPO stage
        moved = not np.array_equal(sft[name], dpo[name])
        assert moved == (".layers.2." in name or ".layers.3." in name), name


def test_gemma_laser_qlora_sft_then_dpo(tmp_path):
    """The laser-QLoRA twin: NF4 base, adapters on layers 2 and 3 only; the DPO stage starts from the SFT stage's
    merged export (re-quantised losslessly: NF4 values are their own codes), so only layers 2 and 3 move, and
    each stage's PEFT folder holds adapters of those layers alone."""
    import re
    run_dir = tmp_path / "run"
    assert train.main(["tiny_gemma_7b_sft_dpo_qlora.yaml", f"run.output_dir={run_dir}", *QUICK]) == 0
    assert load_config(str(run_dir / "2_dpo" / "config.yaml")).model.path == str(run_dir / "1_sft" / "hf")
    assert "rewards/chosen" in _rows(run_dir / "2_dpo")[0]
    sft, dpo = _tensors(run_dir / "1_sft" / "hf"), _tensors(run_dir / "2_dpo" / "hf")
    for name in sft:
        moved = not np.array_equal(sft[name], dpo[name])
        assert moved == bool(re.search(r"layers\.[23]\..*_proj", name)), name
    for stage in ("1_sft", "2_dpo"):
        adapters = SafetensorsFile(run_dir / stage / "hf" / "adapter" / "adapter_model.safetensors").keys()
        assert adapters and all(re.search(r"\.layers\.[23]\.", key) for key in adapters)


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
