"""EasyDeL's DPOTrainer on a Hugging Face Llama folder, timed per step (run with a venv holding easydel,
pillow and torch).

The policy is loaded in fp32 everywhere: EasyDeL's converter otherwise loads the torch weights in fp16 and
its attention defaults to bf16. No remat, no scan, no chunked head (its defaults); the trainer makes the
frozen reference (a copy of the initial policy) and runs it inside the jitted step. DPO sigmoid, beta 0.1,
AdamW 1e-3 constant, weight decay 0, no clipping. The rows are pre-tokenised (its own tokenisation is
skipped). EasyDeL blocks on each step; consecutive `on_step_end` calls bound one step.
"""
from __future__ import annotations

import tempfile
import time
from importlib import metadata

import easydel as ed
import jax
import jax.numpy as jnp
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from synthetic import arguments, preference_batches, write_result


def main() -> None:
    args = arguments(__doc__)
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        args.model, dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
        backend=ed.EasyDeLBackends.CPU, platform=ed.EasyDeLPlatforms.JAX, sharding_axis_dims=(1, 1, 1, 1, 1),
        auto_shard_model=True, torch_dtype=torch.float32,
        config_kwargs=ed.EasyDeLBaseConfigDict(
            attn_mechanism="vanilla", attn_dtype=jnp.float32, kvdtype=jnp.float32, attn_softmax_dtype=jnp.float32,
            gradient_checkpointing=ed.EasyDeLGradientCheckPointers.NONE, use_scan_mlp=False,
            scan_attention_layers=False, lmhead_chunksize=None))
    total = args.warmup + args.steps
    rows = {f"{side}_{key}": [] for side in ("prompt", "chosen", "rejected") for key in ("input_ids", "attention_mask")}
    for batch in preference_batches(total, args.pairs, args.prompt_len, args.completion_len, model.config.vocab_size):
        for side, ids in zip(("prompt", "chosen", "rejected"), batch):
            rows[f"{side}_input_ids"] += ids.tolist()
            rows[f"{side}_attention_mask"] += [[1] * ids.shape[1]] * ids.shape[0]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ends, losses = [], []

    class Clocked(ed.DPOTrainer):
        def on_step_end(self, state, metrics, step):
            ends.append(time.perf_counter())
            losses.append(float(metrics.loss))
            return super().on_step_end(state=state, metrics=metrics, step=step)

    with tempfile.TemporaryDirectory() as save_dir:
        config = ed.DPOConfig(
            beta=0.1, loss_type="sigmoid", label_smoothing=0.0, learning_rate=1e-3,
            scheduler=ed.EasyDeLSchedulers.NONE, optimizer=ed.EasyDeLOptimizers.ADAMW, weight_decay=0.0,
            clip_grad=None, warmup_steps=0, total_batch_size=args.pairs, gradient_accumulation_steps=1,
            max_prompt_length=args.prompt_len, max_completion_length=args.completion_len,
            max_length=args.prompt_len + args.completion_len, max_training_steps=total, num_train_epochs=1,
            shuffle_train_dataset=False, precompute_ref_log_probs=False, logprob_vocab_chunk_size=None,
            use_wandb=False, report_metrics=False, do_last_save=False, save_steps=None, save_directory=save_dir,
            save_tpu_preemption_checkpoints=False, do_eval=False, track_memory=False, progress_bar_type="json",
            log_steps=10 ** 9, report_steps=10 ** 9, performance_mode=True)
        trainer = Clocked(arguments=config, model=model, reference_model=None, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict(rows))
        start = time.perf_counter()
        trainer.train()
    stamps = [start] + ends
    write_result(args, [b - a for a, b in zip(stamps, stamps[1:])], losses,
                 versions={"easydel": metadata.version("easydel"), "jax": jax.__version__},
                 settings="fp32 (weights, attention, softmax), no remat, no scan, vanilla attention, full logits, "
                          "reference forward inside the step")


if __name__ == "__main__":
    main()
