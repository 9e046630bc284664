"""Typed run configuration: dataclasses, YAML files, dotted `key=value` overrides, value checks.

Every YAML is applied on top of the bundled `configs/base.yaml` (which holds the logical-axis rules).
Unknown keys and ill-typed or out-of-range values raise `ConfigError` naming the key and the closest valid
one. Choices that name an implementation (model family, loss, chat template, kernels) are checked against
their registries by `maxdpo.configure`, which is what loads configs; this module imports nothing of maxdpo.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DEFAULT_CONFIG = "tiny_llama_dpo.yaml"


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


def free(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A field a resumed run may change: where and how things run or are logged, saved and exported, not what
    is trained."""
    return dataclasses.field(default=default, metadata={"free_on_resume": True}, **kwargs)


@dataclasses.dataclass
class RunConfig:
    name: str = "maxdpo"
    output_dir: str = free("runs/maxdpo")
    seed: int = 42


@dataclasses.dataclass
class ModelConfig:
    family: str = "llama"
    path: Optional[str] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    overrides: dict = dataclasses.field(default_factory=dict)
    attention: str = free("xla")
    moe_impl: str = free("dense")
    remat: str = free("none")
    scan_layers: bool = free(True)
    logits_chunk: int = free(512)  # positions per vocabulary projection in the loss; 0: the whole sequence at once


@dataclasses.dataclass
class ReferenceConfig:
    path: Optional[str] = None
    precompute: bool = False
    sync_steps: int = 0  # TR-DPO: every N steps the reference becomes mixup_alpha x policy + (1 - it) x itself
    mixup_alpha: float = 0.6  # (TRL's ref_model_sync_steps / ref_model_mixup_alpha); 0 steps: a fixed reference


@dataclasses.dataclass
class TokenizerConfig:
    path: Optional[str] = None


@dataclasses.dataclass
class ColumnsConfig:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"  # unpaired rows (KTO, BCO): one completion and its label
    label: str = "label"


@dataclasses.dataclass
class DataConfig:
    train: Optional[str] = None
    eval: Optional[str] = None
    train_split: str = "train"  # the split read from a hub name, a hub-shaped folder or a saved DatasetDict
    eval_split: str = "test"
    format: str = "auto"
    columns: ColumnsConfig = dataclasses.field(default_factory=ColumnsConfig)
    chat_template: str = "auto"
    system_prompt: Optional[str] = None
    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "keep_end"
    shuffle: bool = True
    packing: bool = False
    prefix_sharing: bool = False  # one row per pair, prompt | chosen | rejected: the prompt runs once
    skip_invalid: bool = False
    num_proc: Optional[int] = free(None)  # tokenisation processes; None: up to 8 for large data, 1 for small
    cache: bool = free(True)
    cache_dir: Optional[str] = free(None)  # None: $MAXDPO_CACHE_DIR or ~/.cache/maxdpo


@dataclasses.dataclass
class DPOConfig:
    loss: Union[list, str] = "sigmoid"  # a name, or a list of names summed with loss_weights (TRL's loss_type)
    loss_weights: Optional[list] = None  # one weight per listed loss (default 1 each)
    beta: float = 0.1
    label_smoothing: float = 0.0
    dpop_lambda: float = 50.0
    simpo_gamma: float = 0.5  # SimPO's target reward margin γ (TRL's default)
    discopop_tau: float = 0.05  # DiscoPOP's modulation temperature τ
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # α of alpha_divergence
    ld_alpha: Optional[float] = None  # LD-DPO: weight of the longer completion's tokens past the shorter's length
    use_weighting: bool = False  # WPO: weight each pair's loss by its completions' probabilities under the policy
    desirable_weight: float = 1.0  # KTO / APO-zero unpaired: weight of the desirable examples' losses
    undesirable_weight: float = 1.0  # ... and of the undesirable ones' (KTO paper, eq. 8, for imbalanced data)
    sft_weight: float = 0.0
    router_aux_coef: float = 0.0

    @property
    def loss_names(self) -> list:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @property
    def objective(self) -> Union[str, tuple]:
        """`loss` as the steps take it: a name, or ((name, weight), ...) for a list of several."""
        if isinstance(self.loss, str):
            return self.loss
        if len(self.loss) == 1 and not self.loss_weights:
            return self.loss[0]
        weights = self.loss_weights or [1.0] * len(self.loss)
        return tuple((name, float(weight)) for name, weight in zip(self.loss, weights))


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 1e-6  # TRL DPOConfig default
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    moment_dtype: str = "float32"  # Adam's moments; bfloat16 halves their memory (stochastically rounded)


@dataclasses.dataclass
class TrainerConfig:
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    epochs: int = 1
    max_steps: int = -1
    eval_every: int = free(0)
    save_every: int = free(0)
    log_every: int = free(1)
    keep_checkpoints: int = free(3)
    resume: str = free("auto")

    @property
    def micro_batch(self) -> int:
        """Rows per micro batch (one gradient accumulation step): the whole batch unless micro_batch_size is set."""
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation_steps(self) -> int:
        """Micro batches per step (gradient accumulation)."""
        return self.batch_size // self.micro_batch


@dataclasses.dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    logical_axis_rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FreezeConfig:
    trainable: list = dataclasses.field(default_factory=list)
    frozen: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoraConfig:
    rank: int = 0  # 0: no adapters; > 0: adapters of this rank are the only trainable parameters
    alpha: float = 16.0
    rslora: bool = False  # scale = alpha / sqrt(rank) (PEFT use_rslora) instead of alpha / rank
    targets: list = dataclasses.field(default_factory=list)  # regexes over HF weight names (as freeze.*)
    quantize: Optional[str] = None  # nf4: QLoRA, the layers' projection weights stored 4-bit


@dataclasses.dataclass
class ExportConfig:
    hf: bool = True
    dtype: Optional[str] = None


@dataclasses.dataclass
class EvalConfig:
    samples: int = free(0)  # at each evaluation, sample this many fixed eval prompts (samples.jsonl, TensorBoard)
    max_new_tokens: int = free(64)
    temperature: float = free(0.0)  # 0: greedy


@dataclasses.dataclass
class LogConfig:
    wandb: bool = free(False)  # also log to Weights & Biases (`pip install maxdpo[wandb]`; WANDB_MODE=offline works)
    project: str = free("maxdpo")
    name: Optional[str] = free(None)  # None: run.name
    tags: list = free(default_factory=list)


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    eval: EvalConfig = free(default_factory=EvalConfig)
    log: LogConfig = free(default_factory=LogConfig)
    mesh: MeshConfig = free(default_factory=MeshConfig)
    freeze: FreezeConfig = dataclasses.field(default_factory=FreezeConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    export: ExportConfig = free(default_factory=ExportConfig)
    stages: list = dataclasses.field(default_factory=list)  # multi-stage runs: see maxdpo/stages.py


def _check_lora(cfg: Config) -> None:
    lora = cfg.lora
    if lora.rank < 0:
        raise ConfigError(f"config key 'lora.rank' must be >= 0 (0: no adapters), got {lora.rank}")
    if not lora.rank:
        if lora.quantize:
            raise ConfigError("lora.quantize stores the frozen base of a LoRA run; set lora.rank > 0")
        return
    if lora.alpha <= 0:
        raise ConfigError(f"config key 'lora.alpha' must be > 0, got {lora.alpha}")
    if cfg.freeze.trainable or cfg.freeze.frozen:
        raise ConfigError("lora.targets chooses what trains when lora.rank > 0; unset freeze.trainable / freeze.frozen")
    if cfg.reference.path:
        raise ConfigError("with lora.rank > 0 the reference is the adapter-free base model; unset reference.path")


# Choices that are settings rather than implementations (those are checked by maxdpo.configure).
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.format": ("auto", "plain", "conversational"),
    "data.truncation": ("keep_start", "keep_end"),
    "optimizer.name": ("adamw",),
    "optimizer.moment_dtype": ("float32", "bfloat16"),
    "trainer.resume": ("auto", "never"),
    "export.dtype": (None, "float32", "bfloat16", "float16"),
    "lora.quantize": (None, "nf4"),
}


def compile_patterns(patterns: list[str], key: str) -> list[re.Pattern]:
    """The regexes of config key `key`; an invalid one is a ConfigError naming it."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ConfigError(f"config key '{key}': {pattern!r} is not a valid regular expression ({err})") from err
    return compiled


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:  # the first type that takes the value; the last one's error otherwise
            try:
                return _coerce(value, candidate, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "5e-7" as a string
        except ValueError:
            pass
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {value!r}")
    return value


def _merge_dicts(base: dict, updates: dict) -> dict:
    """Free-form mappings (model.overrides, rules) merge key by key, so one override keeps the rest."""
    merged = dict(base)
    for key, value in updates.items():
        merged[key] = (_merge_dicts(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(value, dict)
                       else value)
    return merged


def apply_mapping(obj: Any, updates: dict, prefix: str = "") -> None:
    """Sets `updates` (a nested mapping) on a config section; errors name keys as `prefix` + key."""
    fields = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            valid = [f"{prefix}{n}" for n in fields]
            raise ConfigError(f"unknown config key '{key}'{_closest(key, valid)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping, got {value!r}")
            apply_mapping(current, value, prefix=f"{key}.")
        elif isinstance(current, dict) and value is None:
            setattr(obj, name, {})  # `key=null` clears a mapping
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, name, _merge_dicts(current, value))
        else:
            setattr(obj, name, _coerce(value, fields[name], key))


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
    return keys


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`<problem> at line L, column C` from a YAML error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_yaml_problem(err)})") from err
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def overrides_set(overrides: tuple[str, ...] | list[str], key: str) -> bool:
    """Whether any `key=value` override sets dotted `key` or a part of it."""
    for text in overrides:
        node = parse_override(text)
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            content = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err})") from err
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return content


def bundled_config_path(name: str) -> Path:
    return Path(str(importlib.resources.files("maxdpo.configs").joinpath(name)))


def resolve_config_path(name: str) -> Path:
    """A path as given, or else the name of a bundled config."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = bundled_config_path(path.name)
    if bundled.is_file():
        return bundled
    raise ConfigError(f"config file not found: {name} (nor a bundled config of that name)")


def value_of(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_choice(cfg: Config, key: str, allowed) -> None:
    if value_of(cfg, key) not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value_of(cfg, key)!r}")


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float setting is a number: NaN or infinity in any of them is a config error naming the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{prefix}{f.name}' must be a finite number, got {value}")


def check_values(cfg: Config) -> None:
    """Types are checked as keys are set; this checks ranges, settings' choices and consistency."""
    for key, allowed in CHOICES.items():
        check_choice(cfg, key, allowed)
    _check_finite(cfg)
    optimizer = cfg.optimizer
    if optimizer.learning_rate < 0:  # 0 is allowed: a run that only evaluates
        raise ConfigError(f"config key 'optimizer.learning_rate' must be >= 0, got {optimizer.learning_rate}")
    for key in ("b1", "b2"):
        if not 0.0 <= getattr(optimizer, key) < 1.0:
            raise ConfigError(f"config key 'optimizer.{key}' must be in [0, 1), got {getattr(optimizer, key)}")
    if optimizer.eps <= 0:
        raise ConfigError(f"config key 'optimizer.eps' must be > 0, got {optimizer.eps}")
    for key in ("weight_decay", "warmup_steps", "max_grad_norm"):  # max_grad_norm 0: no clipping
        if getattr(optimizer, key) < 0:
            raise ConfigError(f"config key 'optimizer.{key}' must be >= 0, got {getattr(optimizer, key)}")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"config key 'dpo.beta' must be > 0, got {cfg.dpo.beta}")
    if cfg.model.logits_chunk < 0:
        raise ConfigError(f"config key 'model.logits_chunk' must be >= 0 (0: no chunking), got {cfg.model.logits_chunk}")
    if cfg.dpo.router_aux_coef < 0:
        raise ConfigError(f"config key 'dpo.router_aux_coef' must be >= 0, got {cfg.dpo.router_aux_coef}")
    if not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"config key 'dpo.label_smoothing' must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
    if cfg.dpo.discopop_tau <= 0:
        raise ConfigError(f"config key 'dpo.discopop_tau' must be > 0 (the paper's 0.05), got {cfg.dpo.discopop_tau}")
    if cfg.dpo.f_alpha_divergence_coef <= 0:
        raise ConfigError("config key 'dpo.f_alpha_divergence_coef' must be > 0, got "
                          f"{cfg.dpo.f_alpha_divergence_coef}")
    if cfg.dpo.ld_alpha is not None and not 0.0 <= cfg.dpo.ld_alpha <= 1.0:
        raise ConfigError(f"config key 'dpo.ld_alpha' must be in [0, 1] (null: off), got {cfg.dpo.ld_alpha}")
    if cfg.reference.sync_steps < 0:
        raise ConfigError("config key 'reference.sync_steps' must be >= 0 (0: no sync), got "
                          f"{cfg.reference.sync_steps}")
    if not 0.0 < cfg.reference.mixup_alpha <= 1.0:
        raise ConfigError(f"config key 'reference.mixup_alpha' must be in (0, 1], got {cfg.reference.mixup_alpha}")
    if cfg.eval.samples < 0 or cfg.eval.max_new_tokens < 1 or cfg.eval.temperature < 0:
        raise ConfigError("config keys 'eval.samples' (>= 0), 'eval.max_new_tokens' (>= 1) and 'eval.temperature' "
                          f"(>= 0) are out of range: {cfg.eval}")
    if cfg.eval.samples and not cfg.data.eval:
        raise ConfigError("eval.samples samples the eval prompts at each evaluation; set data.eval")
    for key in ("dpop_lambda", "simpo_gamma", "sft_weight", "desirable_weight", "undesirable_weight"):
        if getattr(cfg.dpo, key) < 0:
            raise ConfigError(f"config key 'dpo.{key}' must be >= 0, got {getattr(cfg.dpo, key)}")
    _check_lora(cfg)
    if cfg.trainer.batch_size <= 0:
        raise ConfigError(f"config key 'trainer.batch_size' must be > 0, got {cfg.trainer.batch_size}")
    micro = cfg.trainer.micro_batch_size
    if micro is not None and (micro <= 0 or cfg.trainer.batch_size % micro):
        raise ConfigError(
            f"config key 'trainer.micro_batch_size' ({micro}) must divide trainer.batch_size ({cfg.trainer.batch_size})")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({cfg.data.max_prompt_length}) must be below "
            f"data.max_length ({cfg.data.max_length})")
    if cfg.data.num_proc is not None and cfg.data.num_proc < 1:
        raise ConfigError(f"config key 'data.num_proc' must be >= 1 or null, got {cfg.data.num_proc}")
    if not 0.0 <= cfg.optimizer.warmup_ratio <= 1.0:
        raise ConfigError(f"config key 'optimizer.warmup_ratio' must be in [0, 1], got {cfg.optimizer.warmup_ratio}")
    for axis in ("data", "fsdp", "tensor", "expert"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be a positive size or -1, got {size}")


def read_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """base.yaml <- the config file (bundled default when None) <- dotted overrides; values checked.

    A config file that describes a random-init model (model.path null, its shape in model.overrides and
    its tokenizer in tokenizer.path, as the bundled default does) gives way to a model.path named on the
    command line: that model's config.json and tokenizer are used, unless the command line sets
    model.overrides or tokenizer.path itself."""
    cfg = Config()
    apply_mapping(cfg, _read_yaml(bundled_config_path("base.yaml")))
    apply_mapping(cfg, _read_yaml(resolve_config_path(path or DEFAULT_CONFIG)))
    random_init = cfg.model.path is None
    for text in overrides:
        apply_mapping(cfg, parse_override(text))
    if random_init and cfg.model.path is not None:
        if not overrides_set(overrides, "model.overrides"):
            cfg.model.overrides = {}
        if not overrides_set(overrides, "tokenizer.path"):
            cfg.tokenizer.path = None
    check_values(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(content: dict) -> Config:
    cfg = Config()
    apply_mapping(cfg, content)
    check_values(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def valid_keys() -> list[str]:
    return _all_keys(Config())


def resume_free_keys(section: Any = Config, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys (and `section.` prefixes of whole sections) declared with `free`."""
    keys: list[str] = []
    for f in dataclasses.fields(section):
        subsection = dataclasses.is_dataclass(f.default_factory)
        if f.metadata.get("free_on_resume"):
            keys.append(f"{prefix}{f.name}" + ("." if subsection else ""))
        elif subsection:
            keys += resume_free_keys(f.default_factory, f"{prefix}{f.name}.")
    return tuple(keys)
