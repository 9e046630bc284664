"""Loads run configs: `maxdpo.config`'s reading and value checks, then the choices that name an implementation
checked against the registries that hold them (model families, kernels, losses, chat templates, schedules)."""
from __future__ import annotations

import importlib.util
from typing import Optional

from maxdpo.config import Config, ConfigError, check_choice, config_from_dict, read_config
from maxdpo.data.templates import BUILTIN_TEMPLATES
from maxdpo.dpo.losses import F_DIVERGENCES, LOSSES, loss_record
from maxdpo.dpo.optim import DECAYS
from maxdpo.kernels import ATTENTION_IMPLEMENTATIONS
from maxdpo.models.moe import EXPERT_IMPLEMENTATIONS
from maxdpo.models.registry import FAMILIES
from maxdpo.models.transformer import REMAT_POLICIES

REGISTRIES = {
    "model.family": FAMILIES,
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "model.moe_impl": EXPERT_IMPLEMENTATIONS,
    "model.remat": ("none", *REMAT_POLICIES),
    "dpo.f_divergence_type": F_DIVERGENCES,
    "optimizer.schedule": DECAYS,
}


def _check_chat_template(template: str) -> None:
    names = ("auto", *BUILTIN_TEMPLATES)
    if template not in names and not template.endswith(".jinja") and not ("{{" in template or "{%" in template):
        raise ConfigError(f"config key 'data.chat_template' must be one of {list(names)}, a .jinja file or a Jinja "
                          f"template string, got {template!r}")


def _check_loss_list(dpo) -> None:
    """`dpo.loss` names known losses; a list of several combines DPOTrainer's (a reference-free pair loss trains
    under another TRL trainer and is not mixed), with `loss_weights` one non-negative weight per name."""
    names = dpo.loss_names
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        raise ConfigError(f"config key 'dpo.loss' must be one of {list(LOSSES)} or a list of them, got {dpo.loss!r}")
    if dpo.loss_weights is not None:
        if isinstance(dpo.loss, str) or len(dpo.loss_weights) != len(dpo.loss):
            raise ConfigError(f"config key 'dpo.loss_weights' needs one weight per loss of a dpo.loss list; got "
                              f"{dpo.loss_weights} for {dpo.loss!r}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in dpo.loss_weights):
            raise ConfigError(f"config key 'dpo.loss_weights' must be numbers >= 0, got {dpo.loss_weights}")
    if len(names) > 1:
        alone = [name for name in names if not LOSSES[name].needs_reference and not LOSSES[name].completions]
        if alone:
            raise ConfigError(f"dpo.loss {alone} train without a reference (TRL's CPOTrainer / ORPOTrainer) and are "
                              "not mixed with other losses; use one of them alone")
        unpaired = [name for name in names if LOSSES[name].unpaired]
        if unpaired:
            raise ConfigError(f"dpo.loss {unpaired} train on labelled single completions (TRL's KTOTrainer / "
                              "BCOTrainer) and are not mixed with pair losses; use one of them alone")


def _check_loss(cfg: Config) -> None:
    """The loss's record says which hyper-parameters it reads and needs, and whether it has a reference."""
    dpo = cfg.dpo
    _check_loss_list(dpo)
    name, loss = dpo.loss, loss_record(dpo.objective)
    for key, unset in (("label_smoothing", 0.0), ("desirable_weight", 1.0), ("undesirable_weight", 1.0)):
        if getattr(dpo, key) != unset and key not in loss.reads:
            readers = [other for other, record in LOSSES.items() if key in record.reads]
            raise ConfigError(f"config key 'dpo.{key}' is used by the losses {readers} only; dpo.loss '{name}' "
                              "would ignore it")
    if loss.unpaired:
        _check_unpaired(cfg, name, loss)
    for key in loss.requires:
        if not getattr(dpo, key):
            raise ConfigError(f"dpo.loss '{name}' needs dpo.{key} > 0" + (f" ({loss.hint})" if loss.hint else ""))
    if dpo.f_divergence_type != "reverse_kl" and not loss.f_divergence:
        readers = [other for other, record in LOSSES.items() if record.f_divergence]
        raise ConfigError(f"config key 'dpo.f_divergence_type' ({dpo.f_divergence_type}) applies to the losses "
                          f"{readers} only; dpo.loss '{name}' takes the log-ratios themselves")
    if dpo.ld_alpha is not None and (cfg.data.prefix_sharing or cfg.reference.precompute or loss.completions
                                     or not loss.needs_reference):
        raise ConfigError("dpo.ld_alpha (LD-DPO) weighs the policy's and the reference's log-probs of each pair as "
                          "they are computed on device; it works with paired reference losses without "
                          "data.prefix_sharing or reference.precompute")
    if dpo.use_weighting and (cfg.data.prefix_sharing or loss.completions or not loss.needs_reference
                              or loss.batch_level):
        raise ConfigError("dpo.use_weighting (WPO) weighs the paired reference losses but aot and aot_unpaired (as "
                          "TRL), and needs the two-row layout (unset data.prefix_sharing)")
    if loss.sequence_nll and dpo.sft_weight:
        raise ConfigError(f"dpo.loss '{name}' has its own NLL term (the chosen sequence's, prompt included); unset "
                          "dpo.sft_weight")
    if loss.sequence_nll and cfg.data.prefix_sharing:
        raise ConfigError(f"dpo.loss '{name}' takes the NLL of each chosen sequence with its prompt, which "
                          "data.prefix_sharing does not keep per sequence; unset data.prefix_sharing")
    if cfg.reference.sync_steps and not loss.needs_reference:
        raise ConfigError(f"dpo.loss '{name}' trains without a reference model; unset reference.sync_steps")
    if cfg.reference.sync_steps and cfg.reference.precompute:
        raise ConfigError("reference.sync_steps moves the reference every few steps, so its log-probs cannot be "
                          "computed once ahead (reference.precompute); unset one of them")
    if cfg.reference.sync_steps and cfg.lora.rank:
        raise ConfigError("with lora.rank > 0 the reference is the adapter-free base, which reference.sync_steps "
                          "cannot move without a second copy of the model; unset reference.sync_steps")
    if not loss.needs_reference and (cfg.reference.path or cfg.reference.precompute):
        raise ConfigError(f"dpo.loss '{name}' trains without a reference model; unset reference.path and "
                          "reference.precompute")


def _check_unpaired(cfg: Config, name: str, loss) -> None:
    """KTO and BCO weigh single completions: none of the pair options apply; KTO's KL estimate needs at least two
    examples per micro-batch (each one's mismatched completion is another's)."""
    dpo = cfg.dpo
    pair_options = [f"dpo.{key}" for key, value in (("sft_weight", dpo.sft_weight), ("ld_alpha", dpo.ld_alpha),
                                                     ("use_weighting", dpo.use_weighting)) if value]
    if pair_options:
        raise ConfigError(f"dpo.loss '{name}' trains on labelled single completions; {pair_options} apply to "
                          "preference pairs only")
    if loss.anchor == "kl" and cfg.trainer.micro_batch < 2:
        raise ConfigError(f"dpo.loss '{name}' estimates its KL term from each micro-batch's mismatched examples and "
                          f"needs trainer.micro_batch_size >= 2 (got {cfg.trainer.micro_batch}), as TRL does")


def validate(cfg: Config) -> Config:
    for key, registry in REGISTRIES.items():
        check_choice(cfg, key, tuple(registry))
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb logs to Weights & Biases, which is not installed: pip install 'maxdpo[wandb]'")
    _check_chat_template(cfg.data.chat_template)
    _check_loss(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """base.yaml <- the config file (bundled default when None) <- dotted overrides; then validated."""
    return validate(read_config(path, overrides))


def from_dict(content: dict) -> Config:
    return validate(config_from_dict(content))
