"""Trainer features end to end: freezing, precomputed reference logps, bf16 compute with fp32 master weights,
a reference checkpoint, and resuming under another config."""
import json

import jax
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file

import maxdpo
from hf_models import tiny_llama
from maxdpo import train
from maxdpo.config import ConfigError, FreezeConfig
from maxdpo.configure import load_config
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.freeze import trainable_split
from maxdpo.dpo.optim import decay_mask
from maxdpo.models.registry import get_family
from maxdpo.program import architecture_from_config, build_train_program
from maxdpo.sharding import make_mesh
from maxdpo.weights import init_params

BASE = ["trainer.batch_size=8", "trainer.log_every=1", "data.eval=null", "trainer.max_steps=3",
        "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny HF Llama (3 layers) with the bundled tokenizer: freeze patterns address its tensor names."""
    path = tmp_path_factory.mktemp("base") / "model"
    tiny_llama(path, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    transformers.AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer")).save_pretrained(path)
    return path


def _model_args(path):
    return [f"model.path={path}", "tokenizer.path=null", "model.overrides=null"]


def test_freeze_patterns_keep_frozen_tensors_bitwise_and_train_the_rest(base_model, tmp_path):
    """Layer 1 frozen in every tensor (a slice of each stacked parameter), the embedding frozen, weight decay on:
    those tensors come out bitwise unchanged, all others move."""
    run_dir = tmp_path / "run"
    args = BASE + _model_args(base_model) + ["optimizer.weight_decay=0.1", f"run.output_dir={run_dir}",
                                             r"freeze.frozen=['model\.layers\.1\.', 'embed_tokens']"]
    assert train.main(args) == 0
    before, after = load_file(base_model / "model.safetensors"), load_file(run_dir / "hf" / "model.safetensors")
    frozen = {name for name in before if ".layers.1." in name or "embed_tokens" in name}
    assert len(frozen) == 10
    for name in before:
        same = np.array_equal(before[name], after[name])
        assert same == (name in frozen), name


def test_trainable_list_and_no_optimizer_state_for_frozen_params(base_model):
    spec = maxdpo.load_pretrained(base_model).spec
    family = get_family("llama")
    split = trainable_split(spec, family, FreezeConfig(trainable=[r"layers\.2\.mlp", "lm_head"]))
    model = maxdpo.load_pretrained(base_model)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    trainable = split.trainable(params)
    assert sorted(trainable) == ["layers/mlp/down_proj", "layers/mlp/gate_proj", "layers/mlp/up_proj", "lm_head"]
    assert split.masks["layers/mlp/up_proj"].tolist() == [False, False, True]
    opt_state = optax.adamw(1e-3, mask=decay_mask).init(trainable)
    state_keys = {key for leaf_path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                  for key in [getattr(leaf_path[-1], "key", None)] if key}
    assert "embed" not in state_keys and "layers/attn/q_proj" not in state_keys and "lm_head" in state_keys
    hf = load_file(base_model / "model.safetensors")  # the Hugging Face tensors: an independent count
    total = sum(t.size for t in hf.values())
    chosen = sum(t.size for name, t in hf.items() if ".layers.2.mlp." in name or name == "lm_head.weight")
    assert chosen == 3 * 32 * 64 + 64 * 32  # gate/up/down of one layer (hidden 32, mlp 64) + lm_head (vocab 64)
    assert split.summary(params) == f"{chosen / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable"
    with pytest.raises(ConfigError, match=r"freeze.frozen.*gat_proj.*match no tensor"):
        trainable_split(spec, family, FreezeConfig(frozen=[r"mlp\.gat_proj"]))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        trainable_split(spec, family, FreezeConfig(trainable=["layers.(1"]))
    with pytest.raises(ConfigError, match="leave no parameter to train"):
        trainable_split(spec, family, FreezeConfig(frozen=["model", "lm_head"]))


def test_precomputed_reference_gives_the_live_reference_run_without_reference_weights(tmp_path, monkeypatch):
    """Same metrics as the live reference; the cached table is reused on the next run; while training, device
    memory holds no second copy of the weights."""
    live_bytes = {}

    def recording(name):
        original = maxdpo.trainer.MetricsLog.write

        def write(self, row):
            live_bytes.setdefault(name, []).append(sum(a.nbytes for a in jax.live_arrays()))
            return original(self, row)
        return write

    args = BASE + ["trainer.max_steps=4", "data.eval=bundled:tiny/eval.jsonl", "trainer.eval_every=2"]
    monkeypatch.setattr(maxdpo.trainer.MetricsLog, "write", recording("live"))
    assert train.main(args + [f"run.output_dir={tmp_path / 'live'}"]) == 0
    monkeypatch.undo()
    monkeypatch.setattr(maxdpo.trainer.MetricsLog, "write", recording("precomputed"))
    assert train.main(args + ["reference.precompute=true", f"run.output_dir={tmp_path / 'pre'}"]) == 0
    monkeypatch.undo()
    live, pre = _rows(tmp_path / "live"), _rows(tmp_path / "pre")
    assert [set(r) for r in live] == [set(r) for r in pre]
    for a, b in zip(_strip(live), _strip(pre)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    tables = sorted(p.name for p in (tmp_path / "pre" / "reference_logps").iterdir())
    assert [t.split("-")[0] for t in tables] == ["eval", "train"]
    model_bytes = 4 * architecture_from_config(load_config(None, [])).num_params()
    assert np.median(live_bytes["live"]) - np.median(live_bytes["precomputed"]) >= 0.9 * model_bytes

    # a new run (steps extended, hence a fresh folder) on the same data and reference reuses the table
    table = tmp_path / "pre" / "reference_logps" / tables[1]
    stamp = table.stat().st_mtime_ns
    (tmp_path / "pre" / "checkpoints").rename(tmp_path / "old_checkpoints")
    assert train.main(args + ["reference.precompute=true", f"run.output_dir={tmp_path / 'pre'}"]) == 0
    assert table.stat().st_mtime_ns == stamp


def test_separate_reference_checkpoint(base_model, tmp_path):
    """reference.path: a different model is the reference from step 1 (rewards non-zero before any update)."""
    other = tmp_path / "other"
    tiny_llama(other, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, seed=5)
    args = BASE + _model_args(base_model) + ["trainer.max_steps=1"]
    assert train.main(args + [f"run.output_dir={tmp_path / 'same'}"]) == 0
    assert train.main(args + [f"reference.path={other}", f"run.output_dir={tmp_path / 'other_ref'}"]) == 0
    assert _rows(tmp_path / "same")[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert abs(_rows(tmp_path / "other_ref")[0]["rewards/margins"]) > 1e-3
    wider = tmp_path / "wider"
    tiny_llama(wider, vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3)
    assert train.main(args + [f"reference.path={wider}", f"run.output_dir={tmp_path / 'bad'}"]) == 2


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    args = BASE + ["trainer.max_steps=6"]
    assert train.main(args + [f"run.output_dir={tmp_path / 'fp32'}"]) == 0
    assert train.main(args + ["model.dtype=bfloat16", f"run.output_dir={tmp_path / 'bf16'}"]) == 0
    fp32, bf16 = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert [r["loss"] for r in fp32] != [r["loss"] for r in bf16]  # the compute really ran in bf16
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-2)
    weights = load_file(tmp_path / "bf16" / "hf" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
    # fp32 master weights take updates far below bf16's resolution of the weights
    assert train.main(BASE + ["model.dtype=bfloat16", "optimizer.learning_rate=1e-6", "optimizer.max_grad_norm=0",
                              f"run.output_dir={tmp_path / 'tiny_lr'}"]) == 0
    default = load_config(None, [])
    initial = init_params(build_train_program(default, make_mesh(default.mesh, jax.devices()[:1]), 1), seed=0)
    moved = load_file(tmp_path / "tiny_lr" / "hf" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    start = np.asarray(initial["layers"]["attn"]["q_proj"][0]).reshape(moved.shape[1], -1).T
    delta = np.abs(moved - start)
    below_bf16_resolution = delta < np.abs(start) * 2 ** -9  # a bf16 weight would round these updates away
    assert np.all(delta > 0) and delta.max() < 1e-5 and below_bf16_resolution.mean() > 0.9


def test_resume_under_another_config_is_refused_before_compute(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(BASE + ["trainer.save_every=1", f"run.output_dir={run_dir}"]) == 0
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train.main(BASE + ["trainer.save_every=1", "dpo.beta=0.2", "trainer.max_steps=5",
                              f"run.output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "was written under a different config" in err and "dpo.beta: 0.1 -> 0.2" in err
    assert (run_dir / "metrics.jsonl").read_text() == before
    # settings of logging, saving and placement may change on resume
    assert train.main(BASE + ["trainer.save_every=1", "trainer.log_every=2", "mesh.data=4", "mesh.fsdp=2",
                              f"run.output_dir={run_dir}"]) == 0
