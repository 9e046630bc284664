"""Sampling with the KV cache (`maxdpo.sampling`): greedy decoding equals transformers' `generate` token for token
on the tiny model of every family (Mistral's and Gemma-2's sliding windows passed, Gemma-2's soft-caps,
Mixtral's routing), a batch of prompts of different lengths left-padded, rows stopping at EOS padded after it;
nucleus sampling keeps to the top-p set; `python -m maxdpo.generate` and `eval.samples` say what the model says."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer

import maxdpo
from hf_models import FAMILIES, tiny_hf, tiny_llama
from maxdpo import generate, train
from maxdpo.data.sources import resolve_path
from maxdpo.sampling import SamplingSettings, completions, left_padded, make_sampler, next_tokens

PROMPTS = [[1, 5, 9, 14, 3, 22, 7, 40, 11, 8], [1, 30, 2], [1, 17, 17, 60, 4, 9]]
NEW = 14
PAD = 0


def hf_greedy(model, prompts, eos_token_id):
    ids, mask = left_padded(prompts, PAD)
    out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         max_new_tokens=NEW, do_sample=False, eos_token_id=eos_token_id, pad_token_id=PAD)
    tokens = out[:, ids.shape[1]:].numpy()
    return np.pad(tokens, ((0, 0), (0, NEW - tokens.shape[1])), constant_values=PAD)  # all rows stopped early


def maxdpo_greedy(folder, prompts, eos_token_id):
    graphdef, state = nnx.split(maxdpo.load_pretrained(folder))
    sample = make_sampler(graphdef, SamplingSettings(max_new_tokens=NEW), (eos_token_id,), PAD)
    ids, mask = left_padded(prompts, PAD)
    return np.asarray(sample(nnx.to_pure_dict(state), ids, mask, jax.random.key(0)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decoding_equals_transformers_generate(tmp_path, family):
    model = tiny_hf(tmp_path, family, seed=3)
    never = 96  # an EOS the tiny model does not produce here: every row runs NEW tokens
    expected = hf_greedy(model, PROMPTS, never)
    np.testing.assert_array_equal(maxdpo_greedy(tmp_path, PROMPTS, never), expected)
    # an EOS that a row reaches mid-way: that row stops there (EOS kept) and is padded, the others go on
    eos = int(expected[0, 5])
    stopped = hf_greedy(model, PROMPTS, eos)
    assert (stopped == PAD).any()
    np.testing.assert_array_equal(maxdpo_greedy(tmp_path, PROMPTS, eos), stopped)
    assert completions(stopped, (eos,))[0] == expected[0, :list(expected[0]).index(eos)].tolist()


def test_nucleus_sampling_keeps_to_the_top_p_set():
    """Logits whose softmax is [0.5, 0.3, 0.15, 0.05]: top_p 0.7 draws only tokens 0 and 1, in the ratio 5:3;
    temperature 0 is the argmax."""
    logits = jax.numpy.log(jax.numpy.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = np.asarray(next_tokens(logits, SamplingSettings(temperature=1.0, top_p=0.7), jax.random.key(1)))
    assert set(draws.tolist()) == {0, 1}
    assert np.mean(draws == 0) == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(np.asarray(next_tokens(logits, SamplingSettings(), jax.random.key(1))).tolist()) == {0}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_cli_completes_prompts_as_transformers_generate(tmp_path):
    """`python -m maxdpo.generate FOLDER --prompt ...` (an HF folder with its tokenizer): plain prompts encoded with
    the tokenizer's BOS, greedy completions up to EOS, equal to transformers' generate decoded the same way."""
    model = tiny_llama(tmp_path / "model", seed=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_path("bundled:tiny/tokenizer")) / name, tmp_path / "model" / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts = ["add 1 + 2 =", "copy a b c d :", "next after q ?"]
    out = tmp_path / "out.jsonl"
    assert generate.main([str(tmp_path / "model"), *[a for p in prompts for a in ("--prompt", p)],
                          "--max-new-tokens", "9", "--batch-size", "2", "--out", str(out)]) == 0
    rows = _jsonl(out)
    assert [row["prompt"] for row in rows] == prompts
    for row, prompt in zip(rows, prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        new = model.generate(input_ids=ids, max_new_tokens=9, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        assert row["completion"] == tokenizer.decode(new, skip_special_tokens=True)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert generate.main([str(tmp_path / "model"), "--data", str(data), "--max-new-tokens", "9",
                          "--out", str(out)]) == 0
    assert _jsonl(out) == rows
    # the weights split over FSDP and tensor axes of the 8-device test mesh: the same completions
    assert generate.main([str(tmp_path / "model"), "--data", str(data), "--max-new-tokens", "9", "--out", str(out),
                          "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 0
    assert _jsonl(out) == rows
    assert generate.main([str(tmp_path), "--prompt", "x"]) == 2  # neither a run folder nor an HF folder


def test_eval_samples_are_logged_and_match_the_exported_model(tmp_path):
    """`eval.samples: 3` writes each evaluation's prompt / chosen / greedy policy sample to samples.jsonl and
    TensorBoard; the last evaluation's samples are what `maxdpo.generate` says with the exported run."""
    run = tmp_path / "run"
    assert train.main(["trainer.max_steps=4", "trainer.eval_every=2", "eval.samples=3", "eval.max_new_tokens=6",
                       "optimizer.learning_rate=1e-2", f"run.output_dir={run}"]) == 0
    samples = _jsonl(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]
    eval_rows = _jsonl(Path(resolve_path("bundled:tiny/eval.jsonl")))[:3]
    assert [s["prompt"] for s in samples[3:]] == [row["prompt"] for row in eval_rows]
    assert [s["chosen"] for s in samples[3:]] == [row["chosen"].strip() for row in eval_rows]
    out = tmp_path / "out.jsonl"
    assert generate.main([str(run), "--data", resolve_path("bundled:tiny/eval.jsonl"), "--max-new-tokens", "6",
                          "--out", str(out)]) == 0
    assert [row["completion"] for row in _jsonl(out)[:3]] == [s["sample"] for s in samples[3:]]
    events = list((run / "tensorboard").glob("events.*"))
    assert events and b"samples" in events[0].read_bytes()
