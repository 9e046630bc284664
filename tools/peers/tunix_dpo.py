"""Tunix's DPOTrainer on a Hugging Face Llama folder, timed per step (run with a venv holding google-tunix).

Policy and reference are two loads of the folder into Tunix's Llama 3 model (fp32, no remat, its defaults
otherwise); DPO sigmoid, beta 0.1, optax.adamw(1e-3, weight_decay=0), no clipping. A step starts when the
trainer calls `on_train_step_start`; with max_inflight_computations=1 it has waited for the step before,
so consecutive starts bound one step (reference forward + policy forward/backward + update).
Tunix 0.1.7's attention ignores `rope_theta` (always 1e6); it is patched to the folder's value so the
losses can be compared with the other sides (the cost is the same).
"""
from __future__ import annotations

import json
import os
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tunix.models.llama3 import model as llama
from tunix.models.llama3 import params as llama_params
from tunix.sft import hooks
from tunix.sft.dpo import dpo_trainer

from synthetic import arguments, preference_batches, write_result


def model_config(folder: str) -> llama.ModelConfig:
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    rope_theta = hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 10000.0)
    return llama.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=rope_theta, norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings", False)), remat_config=llama.RematConfig.NONE)


class StepClock(hooks.TrainingHooks):
    def __init__(self):
        self.starts, self.losses = [], []

    def on_train_start(self, train_ctx): pass
    def on_train_end(self, train_ctx): pass
    def on_eval_step_start(self, train_ctx): pass
    def on_eval_step_end(self, train_ctx, eval_loss): pass

    def on_train_step_start(self, train_ctx):
        self.starts.append(time.perf_counter())

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        self.losses.append(float(train_loss))


def main() -> None:
    args = arguments(__doc__)
    cfg = model_config(args.model)
    rope = llama.apply_rope
    llama.apply_rope = lambda inputs, positions, head_dim, rope_theta=None: rope(
        inputs, positions, head_dim, rope_theta=cfg.rope_theta)
    policy, reference = (llama_params.create_model_from_safe_tensors(args.model, cfg, mesh=None, dtype=jnp.float32)
                         for _ in range(2))
    total = args.warmup + args.steps
    config = dpo_trainer.DPOTrainingConfig(
        algorithm="dpo", beta=0.1, label_smoothing=0.0, eval_every_n_steps=10 ** 9, max_steps=total,
        checkpoint_root_directory=None, metrics_logging_options=None, max_inflight_computations=1)
    trainer = dpo_trainer.DPOTrainer(model=policy, ref_model=reference, training_config=config,
                                     optimizer=optax.adamw(learning_rate=1e-3, weight_decay=0.0))
    clock = StepClock()
    trainer.with_training_hooks(clock)
    ones = lambda x: np.ones_like(x)  # noqa: E731
    inputs = (dpo_trainer.TrainingInput(prompt_ids=p, prompt_mask=ones(p), chosen_ids=c, chosen_mask=ones(c),
                                        rejected_ids=r, rejected_mask=ones(r))
              for p, c, r in preference_batches(total, args.pairs, args.prompt_len, args.completion_len,
                                                cfg.vocab_size))
    trainer.train(inputs)
    stamps = clock.starts + [time.perf_counter()]
    write_result(args, [b - a for a, b in zip(stamps, stamps[1:])], clock.losses,
                 versions={"google-tunix": metadata.version("google-tunix"), "jax": jax.__version__},
                 settings="fp32, no remat, layers unrolled, dense einsum attention, full logits, "
                          "reference forward as its own jitted call")


if __name__ == "__main__":
    main()
