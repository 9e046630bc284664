"""End to end: the CLI's default job, its run folder, checkpoints, HF export, and clear errors on bad input."""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import maxdpo
from maxdpo import export, train

METRIC_NAMES = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
                "grad_norm", "learning_rate", "tokens_per_sec"}
GERMAN_SYSTEM = "Du bist ein freundlicher und hilfreicher deutscher KI-Assistent."
SHORT = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=2", "trainer.eval_every=3",
         "trainer.save_every=3", "trainer.keep_checkpoints=5"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("short") / "run"
    assert train.main(SHORT + [f"run.output_dir={run_dir}"]) == 0
    return run_dir


def test_run_folder_contents(short_run):
    assert (short_run / "config.yaml").is_file()
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert any((short_run / "tensorboard").iterdir())
    rows = _rows(short_run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert set(train_rows[0]) == METRIC_NAMES
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert set(eval_rows[0]) == {"step", "epoch"} | {f"eval_{n}" for n in METRIC_NAMES - {
        "step", "epoch", "grad_norm", "learning_rate", "tokens_per_sec"}}


def test_final_export_loads_in_transformers_with_same_logits(short_run):
    hf_dir = short_run / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = np.asarray([tokenizer("add 1 + 2 = 3")["input_ids"]])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(maxdpo.load_pretrained(hf_dir)(ids))
    assert np.abs(ours - theirs).max() < 1e-4


NOTUX_HEADER = ("| Training Loss | Epoch | Step | Validation Loss | Rewards/chosen | Rewards/rejected | Rewards/accuracies "
                "| Rewards/margins | Logps/rejected | Logps/chosen | Logits/rejected | Logits/chosen |")


def _table(card):
    lines = card.splitlines()
    start = lines.index(NOTUX_HEADER)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_model_card_has_hyperparameters_and_the_notux_results_table(short_run):
    card = (short_run / "hf" / "README.md").read_text()
    assert "- learning_rate: 0.001" in card and "- total_train_batch_size: 8" in card and "- beta: 0.1" in card
    assert "- lr_scheduler_type: linear" in card and "- lr_scheduler_warmup_ratio: 0.1" in card
    rows = _rows(short_run)
    evals = [r for r in rows if "eval_loss" in r]
    table = _table(card)
    assert [row[2] for row in table] == ["3", "6"]
    last_train_loss = [r["loss"] for r in rows if "loss" in r and r["step"] <= 3][-1]
    assert table[0][:4] == [f"{last_train_loss:.4f}", f"{evals[0]['epoch']:.2f}", "3", f"{evals[0]['eval_loss']:.4f}"]
    assert table[1][8] == f"{evals[1]['eval_logps/rejected']:.4f}" and table[1][11] == f"{evals[1]['eval_logits/chosen']:.4f}"


def test_export_cli_from_checkpoint(short_run, tmp_path):
    assert export.main([str(short_run / "checkpoints" / "3"), str(tmp_path / "step3"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "step3" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "llama"
    assert (tmp_path / "step3" / "tokenizer.json").is_file()
    assert [row[2] for row in _table((tmp_path / "step3" / "README.md").read_text())] == ["3"]
    assert export.main([str(short_run), str(tmp_path / "last")]) == 0  # newest checkpoint (6) = final export
    last = maxdpo.load_pretrained(tmp_path / "last")
    final = maxdpo.load_pretrained(short_run / "hf")
    ids = np.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(last(ids)), np.asarray(final(ids)))


def test_existing_checkpoints_are_never_overwritten(short_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (short_run / "checkpoints").rglob("*") if p.is_file()}
    assert train.main(SHORT + [f"run.output_dir={short_run}", "trainer.resume=never"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in (short_run / "checkpoints").rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("overrides,message", [
    (["trainer.bacth_size=4"], "unknown config key 'trainer.bacth_size' (did you mean 'trainer.batch_size'?)"),
    (["data.train=/nonexistent/prefs.jsonl"], "data file not found: /nonexistent/prefs.jsonl"),
    (["model.path=/nonexistent_model"], "model folder /nonexistent_model has no config.json"),
    (["trainer.batch_size=12"], "micro batch of 12 rows (trainer.micro_batch_size or trainer.batch_size) is not "
                                "divisible by the data-parallel size 8"),
    (["trainer.batch_size=16", "trainer.micro_batch_size=4"], "micro batch of 4 rows"),
    (["dpo.loss=dpo"], "config key 'dpo.loss' must be one of ['sigmoid', 'ipo'"),
    (["dpo.label_smoothing=0.5"], "'dpo.label_smoothing' must be in [0, 0.5), got 0.5"),
    (["dpo.beta=-1"], "'dpo.beta' must be > 0"),
    (["freeze.frozen=[nothing_matches]"], "['nothing_matches'] match no tensor of this llama model"),
])
def test_bad_input_stops_with_clear_message(tmp_path, capsys, overrides, message):
    assert train.main(overrides + [f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_row_names_file_and_row(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"}) + "\n"
                    + json.dumps({"prompt": "add 2 + 2 =", "rejected": " 5"}) + "\n")
    assert train.main([f"data.train={data}", f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert f"{data}: row 1: 'chosen' is missing" in capsys.readouterr().err


def test_start_from_hf_checkpoint(tmp_path):
    """model.path: an HF folder is the policy and the reference. Naming it on top of the default config is enough:
    the default's random-init shape (model.overrides) and tokenizer give way to the folder's own."""
    from hf_models import tiny_llama
    tiny_llama(tmp_path / "base", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    transformers.AutoTokenizer.from_pretrained(
        maxdpo.data.sources.resolve_path("bundled:tiny/tokenizer")).save_pretrained(tmp_path / "base")
    run_dir = tmp_path / "run"
    assert train.main(["model.path=" + str(tmp_path / "base"), "trainer.max_steps=2", "trainer.batch_size=8",
                       "trainer.log_every=1", f"run.output_dir={run_dir}"]) == 0
    first = _rows(run_dir)[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert (run_dir / "hf" / "model.safetensors").is_file()


def test_default_job_learns_held_out_preferences(tmp_path):
    """`python -m maxdpo.train` with no arguments: the bundled tiny run reaches >= 0.9 held-out accuracy."""
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-m", "maxdpo.train"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny_llama_dpo"
    final_eval = [r for r in _rows(run_dir) if "eval_loss" in r][-1]
    assert final_eval["eval_rewards/accuracies"] >= 0.9
    # The export is the trained model: the newest checkpoint (the last step) exported again gives the same
    # tensors, and transformers computes the same logits from it as maxdpo does.
    assert export.main([str(run_dir), str(tmp_path / "from_checkpoint")]) == 0
    exported, again = (load_file(folder / "model.safetensors")
                       for folder in (run_dir / "hf", tmp_path / "from_checkpoint"))
    assert sorted(exported) == sorted(again) and "model.layers.2.mlp.down_proj.weight" in exported
    for name in exported:
        np.testing.assert_array_equal(exported[name], again[name], err_msg=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = np.asarray([tokenizer("parity of 6 0 4 8 ? even")["input_ids"]])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(maxdpo.load_pretrained(run_dir / "hf")(ids)) - theirs).max() < 1e-4


def whole_and_resumed(tmp_path, args: list[str], last_step: int):
    """(run folder, run folder): `args` run through, and run through then rerun after losing its last
    checkpoint (step `last_step`) and export, so that it resumes from the checkpoint before."""
    import shutil
    assert train.main(args + [f"run.output_dir={tmp_path / 'whole'}"]) == 0
    resumed = tmp_path / "resumed"
    assert train.main(args + [f"run.output_dir={resumed}"]) == 0
    shutil.rmtree(resumed / "checkpoints" / str(last_step))
    shutil.rmtree(resumed / "hf")
    assert train.main(args + [f"run.output_dir={resumed}"]) == 0
    return tmp_path / "whole", resumed


def test_resume_continues_exactly(tmp_path):
    """Losing everything after the step-3 checkpoint and rerunning gives the uninterrupted run's results, with
    bf16 weights and moments too (their stochastic rounding draws its bits from the step; fp32 runs resume
    bitwise in test_kill_resume)."""
    args = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=1", "trainer.save_every=3",
            "data.eval=null", "model.param_dtype=bfloat16", "optimizer.moment_dtype=bfloat16"]
    _, resumed = whole_and_resumed(tmp_path, args, 6)
    drop = {"tokens_per_sec"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(_rows(resumed)) == strip(_rows(tmp_path / "whole"))
    ids = np.arange(16)[None]
    np.testing.assert_array_equal(np.asarray(maxdpo.load_pretrained(resumed / "hf")(ids)),
                                  np.asarray(maxdpo.load_pretrained(tmp_path / "whole" / "hf")(ids)))


def test_chat_data_packed_trains_and_resumes_exactly_mid_epoch(tmp_path, capsys):
    """ultrafeedback-shaped conversations through the llama3 template, packed several pairs to a row: a run
    cut after step 2 (mid-epoch) resumes from the checkpointed iterator state to the uninterrupted result;
    resuming with other data settings is refused."""
    from pathlib import Path
    import shutil
    fixtures = Path(__file__).parent / "data"
    rows = json.loads((fixtures / "formats" / "ultrafeedback_cleaned.json").read_text())
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{**row, "prompt": f"{row['prompt']} ({i})", "chosen": [
        {**row["chosen"][0], "content": f"{row['prompt']} ({i})"}, row["chosen"][1]], "rejected": [
        {**row["rejected"][0], "content": f"{row['prompt']} ({i})"}, row["rejected"][1]]}
        for i in range(6) for row in rows]))
    args = [f"data.train={data}", "data.eval=null",
            f"tokenizer.path={fixtures / 'chat_tokenizer'}", "model.overrides.vocab_size=400",
            "model.overrides.max_position_embeddings=256", "data.chat_template=llama3",
            f"data.system_prompt={GERMAN_SYSTEM}", "data.packing=true", "data.max_length=256",
            "data.max_prompt_length=96", "trainer.batch_size=8", "trainer.epochs=2", "trainer.save_every=2",
            "trainer.log_every=1", "trainer.max_steps=-1"]
    assert train.main(args + [f"run.output_dir={tmp_path / 'whole'}"]) == 0
    whole = _rows(tmp_path / "whole")
    assert len(whole) == 6 and whole[1]["epoch"] == pytest.approx(2 / 3)  # 48 pairs packed into 3 steps an epoch
    resumed = tmp_path / "resumed"
    assert train.main(args + [f"run.output_dir={resumed}"]) == 0
    for lost in ("checkpoints/4", "checkpoints/6", "hf"):
        shutil.rmtree(resumed / lost)
    assert train.main(args + [f"run.output_dir={resumed}"]) == 0  # resumes at step 2, mid-epoch
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]  # noqa: E731
    assert strip(_rows(resumed)) == strip(whole)
    capsys.readouterr()
    assert train.main(args + ["data.max_prompt_length=64", f"run.output_dir={resumed}"]) == 2
    assert "data.max_prompt_length: 96 -> 64" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_good_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.save_every=1", "data.eval=null",
            "optimizer.learning_rate=1e30", "optimizer.max_grad_norm=0", f"run.output_dir={run_dir}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "at step" in err and "batch" in err and "checkpoints" in err
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 6 and not (run_dir / "hf").exists()
    bad_step = int(err.split("at step ")[1].split(",")[0])
    assert max(saved) < bad_step


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", ["model.overrides.num_experts=4", "model.overrides.sliding_window=12", "model.moe_impl=ragged",
                 "dpo.router_aux_coef=0.02"]),
    ("gemma2", ["model.overrides.sliding_window=8", "model.overrides.query_pre_attn_scalar=24",
                "model.overrides.attn_logit_softcap=5.0", "model.overrides.final_logit_softcap=3.0"]),
])
def test_other_families_train_checkpoint_and_export(tmp_path, family, overrides):
    """A non-Llama run: checkpoints, then the final export loads in transformers with the same logits."""
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=4", "trainer.batch_size=8", "trainer.save_every=2", "trainer.eval_every=4",
            f"model.family={family}", f"run.output_dir={run_dir}", *overrides]
    assert train.main(args) == 0
    rows = _rows(run_dir)
    assert any("aux_loss" in r for r in rows) == (family == "mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf", attn_implementation="eager").eval()
    assert hf.config.model_type == family
    ids = np.random.default_rng(0).integers(3, 64, (2, 30))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(maxdpo.load_pretrained(run_dir / "hf")(ids)) - theirs).max() < 1e-4
    assert export.main([str(run_dir / "checkpoints" / "2"), str(tmp_path / "step2")]) == 0
    assert maxdpo.load_pretrained(tmp_path / "step2").spec == maxdpo.load_pretrained(run_dir / "hf").spec


def test_token_ids_outside_the_models_vocabulary_stop_the_run_at_tokenisation(tmp_path, capsys):
    """A tokenizer with no more tokens than the model's vocab_size whose ids still reach past it (a gap in its
    ids): the row is named when the data is tokenised, not found later as a NaN loss blamed on a batch."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(maxdpo.data.sources.resolve_path("bundled:tiny/tokenizer"))
    tokenizer.save_pretrained(tmp_path / "tok")
    content = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    content["model"]["vocab"]["parity"] = 90  # the model (vocab_size 64) has no row 90
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(content))
    assert train.main([f"tokenizer.path={tmp_path / 'tok'}", "trainer.max_steps=1",
                       f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if line.startswith("maxdpo: error")]
    assert "Traceback" not in err
    assert "train.jsonl: row" in error and "token id 90 is not below the model's vocab_size 64" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, caplog):
    """A truncated array file in the newest checkpoint: rerunning names it, keeps it as `<step>.damaged`, resumes
    from the previous checkpoint and ends as an uninterrupted run ends (never silently from scratch)."""
    args = ["trainer.max_steps=8", "trainer.save_every=2", "trainer.log_every=1", "data.eval=null",
            "trainer.keep_checkpoints=5"]
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    assert train.main(args + [f"run.output_dir={run_dir}"]) == 0
    arrays = [p for p in (run_dir / "checkpoints" / "8" / "params").rglob("*") if p.is_file()]
    largest = max(arrays, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="maxdpo"):
        assert train.main(args + [f"run.output_dir={run_dir}"]) == 0
    assert f"checkpoint {run_dir / 'checkpoints' / '8'} is damaged" in caplog.text
    assert f"resuming from {run_dir / 'checkpoints' / '6'} at step 6" in caplog.text
    assert (run_dir / "checkpoints" / "8.damaged").is_dir() and (run_dir / "checkpoints" / "8").is_dir()
    assert train.main(args + [f"run.output_dir={whole}"]) == 0
    assert ([{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _rows(run_dir)]
            == [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _rows(whole)])
    ours, theirs = (load_file(folder / "hf" / "model.safetensors") for folder in (run_dir, whole))
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_rerunning_a_finished_run_logs_nothing_twice_and_redoes_a_lost_export(tmp_path):
    """A finished run run again, or one killed during its final export (here: no hf/ yet, and the staging folder
    of a process that has ended), exports again and leaves metrics.jsonl and the model card as they were: one
    final eval row, no staging folder left."""
    args = ["trainer.max_steps=4", "trainer.log_every=2", f"run.output_dir={tmp_path / 'run'}"]
    assert train.main(args) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    card = (tmp_path / "run" / "hf" / "README.md").read_text()
    weights = (tmp_path / "run" / "hf" / "model.safetensors").read_bytes()
    assert sum("eval_loss" in json.loads(line) for line in metrics.splitlines()) == 1
    shutil.move(tmp_path / "run" / "hf", tmp_path / "run" / ".hf.999999999.0badc0de.partial")
    (tmp_path / "run" / ".hf.999999999.0badc0de.partial" / "model.safetensors").write_bytes(b"cut short")
    assert train.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".hf")) == []
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "run" / "hf" / "README.md").read_text() == card
    assert (tmp_path / "run" / "hf" / "model.safetensors").read_bytes() == weights
