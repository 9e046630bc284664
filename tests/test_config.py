"""Config: YAML + dotted overrides, typed validation, errors that name the key and suggest the closest."""
import re

import pytest

from maxdpo.config import ConfigError, parse_override, valid_keys
from maxdpo.configure import load_config


def test_default_config_resolves():
    cfg = load_config()
    assert cfg.model.family == "llama"
    assert cfg.data.train.startswith("bundled:")
    assert cfg.mesh.logical_axis_rules["heads"] == ["tensor"]  # from base.yaml


def test_overrides_are_typed_and_merge_into_mappings():
    cfg = load_config(None, ["trainer.max_steps=7", "optimizer.learning_rate=5e-7", "model.overrides.num_layers=5"])
    assert cfg.trainer.max_steps == 7
    assert cfg.optimizer.learning_rate == pytest.approx(5e-7)
    assert cfg.model.overrides["num_layers"] == 5
    assert cfg.model.overrides["hidden_size"] == 128  # the rest of the mapping is kept
    assert load_config(None, ["model.overrides=null"]).model.overrides == {}


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.bath_size'.*trainer.batch_size"):
        load_config(None, ["trainer.bath_size=4"])
    with pytest.raises(ConfigError, match=r"'optimiser'.*'optimizer'"):
        load_config(None, ["optimiser.learning_rate=1"])


@pytest.mark.parametrize("override,message", [
    ("trainer.batch_size=four", "trainer.batch_size' must be an integer"),
    ("dpo.beta=0", "dpo.beta' must be > 0"),
    ("dpo.label_smoothing=0.5", "label_smoothing"),
    ("dpo.loss=nope", "dpo.loss' must be one of"),
    ("trainer.micro_batch_size=5", "must divide trainer.batch_size"),
    ("model.scan_layers=maybe", "true or false"),
    ("dpo.label_smoothing=-0.1", "must be in \\[0, 0.5\\)"),
    ("dpo.loss=hinge dpo.label_smoothing=0.1", "used by the losses .*'hinge' would ignore it"),
    ("dpo.loss=exo_pair", "'exo_pair' needs dpo.label_smoothing > 0"),
    ("dpo.dpop_lambda=-1", "dpo.dpop_lambda' must be >= 0"),
    ("dpo.sft_weight=-1", "dpo.sft_weight' must be >= 0"),
    ("dpo.f_divergence_type=kl", "dpo.f_divergence_type' must be one of"),
    ("dpo.loss=dpop dpo.f_divergence_type=js_divergence", "applies to the losses .*'dpop' takes the log-ratios"),
    ("dpo.loss=discopop dpo.discopop_tau=0", "dpo.discopop_tau' must be > 0"),
    ("dpo.f_alpha_divergence_coef=0", "f_alpha_divergence_coef' must be > 0"),
    ("dpo.loss=[sigmoid,nope]", "dpo.loss' must be one of .* or a list of them"),
    ("dpo.loss=[sigmoid,simpo]", "\\['simpo'\\] train without a reference .* not mixed"),
    ("dpo.loss_weights=[1.0]", "one weight per loss of a dpo.loss list"),
    ("dpo.loss=[sigmoid,sft] dpo.loss_weights=[1.0]", "one weight per loss"),
    ("dpo.loss=[sigmoid,sft] dpo.loss_weights=[1.0,-1]", "numbers >= 0"),
    ("dpo.loss=[sigmoid,nca_pair] dpo.f_divergence_type=js_divergence", "applies to the losses"),
    ("dpo.ld_alpha=1.5", "dpo.ld_alpha' must be in \\[0, 1\\]"),
    ("dpo.ld_alpha=0.5 data.prefix_sharing=true", "without data.prefix_sharing or reference.precompute"),
    ("dpo.ld_alpha=0.5 reference.precompute=true", "without data.prefix_sharing or reference.precompute"),
    ("dpo.ld_alpha=0.5 dpo.loss=simpo", "works with paired reference losses"),
    ("dpo.use_weighting=true dpo.loss=aot", "but aot and aot_unpaired"),
    ("dpo.use_weighting=true data.prefix_sharing=true", "unset data.prefix_sharing"),
    ("dpo.loss=orpo dpo.sft_weight=1", "has its own NLL term"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_a_loss_list_is_weighted_terms():
    cfg = load_config(None, ["dpo.loss=[sigmoid,bco_pair,sft]", "dpo.loss_weights=[0.8,0.2,1]"])
    assert cfg.dpo.objective == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    assert load_config(None, ["dpo.loss=[ipo]"]).dpo.objective == "ipo"
    assert load_config(None, ["dpo.loss=[ipo,sft]"]).dpo.objective == (("ipo", 1.0), ("sft", 1.0))


def test_override_parsing_and_key_list():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("trainer.max_steps")
    assert "data.columns.chosen" in valid_keys()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_naming_a_model_replaces_the_default_configs_random_init_shape_and_tokenizer():
    """`python -m maxdpo.train model.path=HF_DIR` on the bundled default (a random-init shape in
    model.overrides, the bundled tokenizer): the named model's config.json and tokenizer are used."""
    cfg = load_config(None, ["model.path=/models/llama", "data.train=rows.jsonl"])
    assert cfg.model.path == "/models/llama" and cfg.model.overrides == {} and cfg.tokenizer.path is None
    kept = load_config(None, ["model.path=/models/llama", "tokenizer.path=/tok", "model.overrides.num_layers=2"])
    assert kept.tokenizer.path == "/tok" and kept.model.overrides["num_layers"] == 2
    assert load_config(None).model.overrides["hidden_size"] == 128  # random init keeps its shape




def test_overrides_given_with_a_model_path_are_refused(tmp_path):
    from hf_models import tiny_llama
    from maxdpo.program import architecture_from_config

    tiny_llama(tmp_path / "model")
    assert architecture_from_config(load_config(None, [f"model.path={tmp_path / 'model'}"])).num_layers == 3
    cfg = load_config(None, [f"model.path={tmp_path / 'model'}", "model.overrides.num_layers=2"])
    with pytest.raises(ConfigError, match="model.overrides applies to random init only"):
        architecture_from_config(cfg)


@pytest.mark.parametrize("override,message", [
    ("optimizer.learning_rate=-1", "'optimizer.learning_rate' must be >= 0, got -1"),
    ("optimizer.learning_rate=.nan", "'optimizer.learning_rate' must be a finite number, got nan"),
    ("dpo.beta=.nan", "'dpo.beta' must be a finite number, got nan"),
    ("dpo.label_smoothing=.inf", "'dpo.label_smoothing' must be a finite number, got inf"),
    ("optimizer.b2=1.0", "'optimizer.b2' must be in [0, 1), got 1.0"),
    ("optimizer.eps=0", "'optimizer.eps' must be > 0"),
    ("optimizer.weight_decay=-0.1", "'optimizer.weight_decay' must be >= 0, got -0.1"),
])
def test_values_that_would_train_wrongly_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
