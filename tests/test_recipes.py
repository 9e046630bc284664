"""Seed recipes: the full-size configs carry their cards' settings; their tiny twins train end to end
(multi-stage chaining, SFT -> DPO, partial freezing). Their compiles for TPU and GPU: test_recipes_aot.py."""
import json

import numpy as np
import pytest
import transformers

from maxdpo import train
from maxdpo.checkpoint.safetensors_io import SafetensorsFile
from maxdpo.config import ConfigError
from maxdpo.configure import load_config
from maxdpo.stages import DONE_FILE, stage_configs

RECIPES = ["mixtral_8x7b_instruct_dpo", "notux_8x7b_dpo", "smaug_mixtral_dpop", "llama3_8b_two_stage_dpo",
           "gemma_7b_sft_dpo"]
QUICK = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1"]


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
