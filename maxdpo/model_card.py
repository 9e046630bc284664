"""The exported model's README.md: hyper-parameters and a results table in the layout of the Hugging Face
Trainer's cards (Training Loss, Epoch, Step, Validation Loss, Rewards/*, Logps/*, Logits/*), one row per
evaluation, built from the run's metrics.jsonl."""
from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from typing import Optional

from maxdpo.atomic import write_text
from maxdpo.config import Config
from maxdpo.dpo.losses import loss_record
from maxdpo.metrics_log import read_rows
from maxdpo.plot import draw_curves

# (column title, eval metric) after Training Loss, Epoch, Step, in the Notux card's order.
CURVES = "curves.png"  # the card's picture of the run's curves, beside it
EVAL_COLUMNS = (("Validation Loss", "eval_loss"), ("Rewards/chosen", "eval_rewards/chosen"),
                ("Rewards/rejected", "eval_rewards/rejected"), ("Rewards/accuracies", "eval_rewards/accuracies"),
                ("Rewards/margins", "eval_rewards/margins"), ("Logps/rejected", "eval_logps/rejected"),
                ("Logps/chosen", "eval_logps/chosen"), ("Logits/rejected", "eval_logits/rejected"),
                ("Logits/chosen", "eval_logits/chosen"))
FRAMEWORKS = (("maxdpo", "maxdpo"), ("JAX", "jax"), ("Flax", "flax"), ("Optax", "optax"), ("Orbax", "orbax-checkpoint"),
              ("Transformers", "transformers"), ("Datasets", "datasets"), ("Tokenizers", "tokenizers"))


ADAPTER_NOTE = ("The weights here are the base with the trained LoRA adapters merged in; the adapters alone are "
                "in `adapter/`, a PEFT folder: `peft.PeftModel.from_pretrained(base_model, \"adapter\")`.")


def results_table(rows: list[dict]) -> str:
    """One line per evaluation; Training Loss is the last training loss logged at or before that step. Columns
    a run does not log (an SFT run has no rewards) are left out."""
    first_eval = next((row for row in rows if "eval_loss" in row), {})
    columns = [(title, metric) for title, metric in EVAL_COLUMNS if metric in first_eval]
    header = ["Training Loss", "Epoch", "Step"] + [title for title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":" + "-" * (len(h) - 2) + ":" for h in header) + "|"]
    train_loss = None
    for row in rows:
        if "loss" in row:
            train_loss = row["loss"]
        if "eval_loss" in row:
            cells = ["No log" if train_loss is None else f"{train_loss:.4f}", f"{row['epoch']:.2f}", str(row["step"])]
            cells += [f"{row[metric]:.4f}" for _, metric in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hyperparameters(cfg: Config, mesh: dict[str, int], data_parallel: int) -> list[str]:
    trainer, opt, dpo = cfg.trainer, cfg.optimizer, cfg.dpo
    num_devices = math.prod(mesh.values())
    micro = trainer.micro_batch
    lines = [f"learning_rate: {opt.learning_rate:g}", f"train_batch_size: {micro // data_parallel}",
             f"eval_batch_size: {micro // data_parallel}", f"seed: {cfg.run.seed}",
             f"distributed_type: {'multi-device' if num_devices > 1 else 'single device'} (JAX mesh {mesh})",
             f"num_devices: {num_devices}", f"gradient_accumulation_steps: {trainer.accumulation_steps}",
             f"total_train_batch_size: {trainer.batch_size}", f"total_eval_batch_size: {micro}",
             f"optimizer: Adam with betas=({opt.b1},{opt.b2}) and epsilon={opt.eps:g}, weight_decay={opt.weight_decay:g}",
             f"lr_scheduler_type: {opt.schedule}"]
    if opt.warmup_steps:
        lines.append(f"lr_scheduler_warmup_steps: {opt.warmup_steps}")
    elif opt.warmup_ratio:
        lines.append(f"lr_scheduler_warmup_ratio: {opt.warmup_ratio:g}")
    lines += [f"num_epochs: {trainer.epochs}"] + ([f"training_steps: {trainer.max_steps}"] if trainer.max_steps > 0 else [])
    lines += [f"max_grad_norm: {opt.max_grad_norm:g}", f"loss: {dpo.loss}",
              *([f"loss_weights: {dpo.loss_weights}"] if dpo.loss_weights else []), f"beta: {dpo.beta:g}"]
    lines += [f"{key}: {getattr(dpo, key):g}" for key in loss_record(dpo.objective).reads if getattr(dpo, key)]
    if dpo.ld_alpha is not None:
        lines.append(f"ld_alpha: {dpo.ld_alpha:g}")
    if dpo.use_weighting:
        lines.append("use_weighting: true (WPO)")
    if cfg.reference.sync_steps:
        lines.append(f"reference sync (TR-DPO): every {cfg.reference.sync_steps} steps, "
                     f"mixup_alpha {cfg.reference.mixup_alpha:g}")
    if dpo.f_divergence_type != "reverse_kl":
        lines.append(f"f_divergence_type: {dpo.f_divergence_type}" + (
            f", f_alpha_divergence_coef: {dpo.f_alpha_divergence_coef:g}"
            if dpo.f_divergence_type == "alpha_divergence" else ""))
    if dpo.sft_weight:
        lines.append(f"sft_weight: {dpo.sft_weight:g}")
    if dpo.router_aux_coef:
        lines.append(f"router_aux_coef: {dpo.router_aux_coef:g}")
    lines += [f"compute_dtype: {cfg.model.dtype}, param_dtype: {cfg.model.param_dtype}",
              f"max_length: {cfg.data.max_length}, max_prompt_length: {cfg.data.max_prompt_length}"]
    if cfg.freeze.trainable or cfg.freeze.frozen:
        lines.append(f"freeze: trainable={cfg.freeze.trainable}, frozen={cfg.freeze.frozen}")
    if cfg.lora.rank:
        lines.append(f"lora: rank={cfg.lora.rank}, alpha={cfg.lora.alpha:g}, rslora={cfg.lora.rslora}, "
                     f"targets={cfg.lora.targets}, quantize={cfg.lora.quantize}")
    return lines


def render(cfg: Config, rows: list[dict], mesh: dict[str, int], data_parallel: int,
           curves: Optional[str] = None) -> str:
    base = cfg.model.path or f"a randomly initialised {cfg.model.family} model"
    data = cfg.data.train
    front = ["---", "library_name: transformers", *([f"base_model: {cfg.model.path}"] if cfg.model.path else []),
             "tags:", "- maxdpo", *(["- dpo"] if loss_record(cfg.dpo.objective).needs_reference else []),
             *(f"- {name}" for name in cfg.dpo.loss_names), *(["- lora"] if cfg.lora.rank else []),
             *(["- qlora"] if cfg.lora.quantize else []), "datasets:", f"- {data}", "model-index:",
             f"- name: {cfg.run.name}", "  results: []", "---"]
    body = [f"# {cfg.run.name}",
            f"This model is a preference-tuned version of {base} on {data} using "
            f"{loss_record(cfg.dpo.objective).title}, trained with maxdpo (JAX).",
            *([ADAPTER_NOTE] if cfg.lora.rank else []),
            "## Training procedure", "### Training hyperparameters",
            "The following hyperparameters were used during training:",
            *(f"- {line}" for line in hyperparameters(cfg, mesh, data_parallel)),
            "### Training results", results_table(rows) if any("eval_loss" in r for r in rows)
            else "No evaluation was run (data.eval not set).",
            *([f"![Training curves: loss, reward margin and accuracy, rewards, log-probs, learning rate]({curves})"]
              if curves else []),
            "### Framework versions", *(f"- {name} {_version(package)}" for name, package in FRAMEWORKS)]
    return "\n".join(front + body) + "\n"


def write_model_card(out_dir: Path, cfg: Config, metrics_path: Path, step: int, mesh: dict[str, int],
                     data_parallel: int) -> Path:
    """README.md in `out_dir`, with the results logged in `metrics_path` up to `step` and their curves
    (`curves.png`, drawn by `maxdpo.plot`)."""
    rows = [row for row in read_rows(metrics_path) if row["step"] <= step]
    curves = None
    if rows:
        draw_curves([(cfg.run.name, rows)], Path(out_dir) / CURVES)
        curves = CURVES
    path = Path(out_dir) / "README.md"
    write_text(path, render(cfg, rows, mesh, data_parallel, curves))
    return path
