"""maxdpo vs TRL's DPOTrainer on the same CPU: same tiny Llama, data, batch and loss; prints the tokens/s ratio.

    python tools/bench_vs_trl.py [--steps 110] [--warmup 10] [--batch 32] [--maxdpo KEY=VALUE ...] [--json F]

Both start from one random Hugging Face Llama of the default job's shape (saved with the bundled
tokenizer), train DPO (sigmoid, beta 0.1, constant lr 1e-3, fp32) on the bundled preference data with
the initial policy as reference, and count real (non-padding) chosen + rejected tokens per step. TRL's
speed is the median over the steps after --warmup of (tokens of the step / its wall time); maxdpo's
the median over windows of --warmup steps after the first (its logged tokens/s), so compile and
first-step costs are excluded on both. With prefix sharing a shared prompt still counts for both
sequences, so layouts compare. Each side runs in its own process. Needs the test extra (torch, trl).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import torch
import transformers
import trl
import yaml
from datasets import Dataset

from maxdpo import train
from maxdpo.configure import load_config
from maxdpo.data.sources import resolve_path


def make_model(folder: Path) -> None:
    """The default job's Llama shape, random, in HF format, with the bundled tokenizer."""
    shape = load_config(None, []).model.overrides
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=shape["max_position_embeddings"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer")).save_pretrained(folder)


def run_trl(folder: Path, rows: list[dict], batch: int, steps: int, warmup: int, out: Path, options: dict) -> dict:
    tokens, ends = [], []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                         beta=0.1, loss_type=["sigmoid"], max_length=32, use_cpu=True, bf16=False, report_to=[],
                         logging_steps=10 ** 9, save_strategy="no", lr_scheduler_type="constant", seed=0,
                         **options)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[StepClock()])
    collate = trainer.data_collator

    def counting(examples):
        collated = collate(examples)
        tokens.append(int(collated["attention_mask"].sum()))
        return collated

    trainer.data_collator = counting
    trainer.train()
    rates = [tokens[i] / (ends[i] - ends[i - 1]) for i in range(max(warmup, 1), len(ends))]
    return dict(steps=len(rates), tokens_per_s=statistics.median(rates), torch_threads=torch.get_num_threads())


def run_maxdpo(folder: Path, batch: int, steps: int, warmup: int, out: Path, overrides: list[str]) -> dict:
    args = [f"model.path={folder}", "tokenizer.path=null", "model.overrides=null", f"trainer.batch_size={batch}",
            f"trainer.max_steps={steps}", f"trainer.log_every={warmup}", "trainer.save_every=0", "data.eval=null",
            "optimizer.learning_rate=1e-3", "optimizer.warmup_ratio=0", "optimizer.schedule=constant",
            "export.hf=false", f"run.output_dir={out}", *overrides]
    if train.main(args) != 0:
        raise RuntimeError("the maxdpo run failed; its log says why")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_sec"] for row in logged if row["step"] > warmup]  # one per window of `warmup` steps
    return dict(windows=len(rates), tokens_per_s=statistics.median(rates), devices=jax.device_count())


def run_side(side: str, args, tmp: Path) -> dict:
    """One framework in its own process, so neither inherits the other's thread pools."""
    out = tmp / f"{side}.json"
    command = [sys.executable, __file__, "--side", side, "--model", str(tmp / "model"), "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    extra = (["--maxdpo", *args.maxdpo] if args.maxdpo else []) + (["--trl", *args.trl] if args.trl else [])
    subprocess.run(command + extra, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--maxdpo", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra maxdpo overrides (e.g. data.packing=true data.prefix_sharing=true)")
    parser.add_argument("--trl", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra DPOConfig fields for TRL (e.g. precompute_ref_log_probs=true)")
    parser.add_argument("--side", choices=["trl", "maxdpo"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child process: run one framework and write its numbers
        work = Path(args.out).parent / args.side
        if args.side == "trl":
            rows = [json.loads(line) for line in Path(resolve_path("bundled:tiny/train.jsonl")).read_text().splitlines()]
            options = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.trl)}
            result = run_trl(Path(args.model), rows, args.batch, args.steps, args.warmup, work, options)
        else:
            result = run_maxdpo(Path(args.model), args.batch, args.steps, args.warmup, work, args.maxdpo)
        Path(args.out).write_text(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        theirs, ours = run_side("trl", args, tmp), run_side("maxdpo", args, tmp)
    result = dict(trl=theirs, maxdpo=ours, ratio=ours["tokens_per_s"] / theirs["tokens_per_s"],
                  trl_version=trl.__version__, torch_version=torch.__version__, jax_version=jax.__version__,
                  batch=args.batch, steps=args.steps, warmup=args.warmup, maxdpo_overrides=args.maxdpo,
                  trl_options=args.trl)
    print(json.dumps(result, indent=1))
    print(f"maxdpo {ours['tokens_per_s']:.0f} tokens/s vs TRL {theirs['tokens_per_s']:.0f} tokens/s: "
          f"{result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
