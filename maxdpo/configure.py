"""Loads run configs: `maxdpo.config`'s reading and value checks, then the choices that name an implementation
checked against the registries that hold them (model families, kernels, losses, chat templates, schedules)."""
from __future__ import annotations

from typing import Optional

from maxdpo.config import Config, ConfigError, check_choice, config_from_dict, read_config
from maxdpo.data.templates import BUILTIN_TEMPLATES
from maxdpo.dpo.losses import F_DIVERGENCES, LOSSES
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
    "dpo.loss": LOSSES,
    "dpo.f_divergence_type": F_DIVERGENCES,
    "optimizer.schedule": DECAYS,
}


def _check_chat_template(template: str) -> None:
    names = ("auto", *BUILTIN_TEMPLATES)
    if template not in names and not template.endswith(".jinja") and not ("{{" in template or "{%" in template):
        raise ConfigError(f"config key 'data.chat_template' must be one of {list(names)}, a .jinja file or a Jinja "
                          f"template string, got {template!r}")


def _check_loss(cfg: Config) -> None:
    """The loss's record says which hyper-parameters it reads and needs, and whether it has a reference."""
    name, dpo = cfg.dpo.loss, cfg.dpo
    loss = LOSSES[name]
    if dpo.label_smoothing and "label_smoothing" not in loss.reads:
        readers = [other for other, record in LOSSES.items() if "label_smoothing" in record.reads]
        raise ConfigError(f"config key 'dpo.label_smoothing' is used by the losses {readers} only; dpo.loss "
                          f"'{name}' would ignore it")
    for key in loss.requires:
        if not getattr(dpo, key):
            raise ConfigError(f"dpo.loss '{name}' needs dpo.{key} > 0" + (f" ({loss.hint})" if loss.hint else ""))
    if dpo.f_divergence_type != "reverse_kl" and not loss.f_divergence:
        readers = [other for other, record in LOSSES.items() if record.f_divergence]
        raise ConfigError(f"config key 'dpo.f_divergence_type' ({dpo.f_divergence_type}) applies to the losses "
                          f"{readers} only; dpo.loss '{name}' takes the log-ratios themselves")
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


def validate(cfg: Config) -> Config:
    for key, registry in REGISTRIES.items():
        check_choice(cfg, key, tuple(registry))
    _check_chat_template(cfg.data.chat_template)
    _check_loss(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """base.yaml <- the config file (bundled default when None) <- dotted overrides; then validated."""
    return validate(read_config(path, overrides))


def from_dict(content: dict) -> Config:
    return validate(config_from_dict(content))
