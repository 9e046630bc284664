"""LoRA against PEFT: the adapted forward, the PEFT adapter folder and the merged export, and a LoRA run whose
reference is its own base (no second copy)."""
from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from maxdpo.checkpoint.hf import load_params, save_params, spec_from_pretrained
from maxdpo.checkpoint.peft import merge_adapters, read_adapter, save_adapter
from maxdpo.config import ConfigError, LoraConfig
from maxdpo.models.lora import merge_trees, plan, split_adapters
from maxdpo.models.spec import Execution
from maxdpo.models.transformer import abstract_model
from tests.hf_models import hf_logits, tiny_hf, tiny_llama

IDS = np.random.default_rng(0).integers(3, 97, (2, 21))
# maxdpo searches HF tensor names; PEFT full-matches module names (a str), or names parameters (a list: the
# router and the fused experts of transformers' Mixtral): the same weights either way.
ATTENTION = (r"self_attn\.(q|v|o)_proj", r".*self_attn\.(q_proj|v_proj|o_proj)")
SOME_MLP = (r"layers\.[02]\.mlp\.(gate|down)_proj", r".*layers\.[02]\.mlp\.(gate_proj|down_proj)")
EXPERTS = (r"experts", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
ROUTER = (r"block_sparse_moe\.gate\.", ["mlp.gate.weight"])
# gate and up of layer 0's experts, the down projection of every layer's
SOME_EXPERTS = (r"layers\.0\..*experts\.\d+\.w[13]|experts\.\d+\.w2",
                ["model.layers.0.mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def randomize_adapters(model, seed=1):
    """Random A and B in a PEFT model (B = 0, PEFT's init, would hide a wrong B)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def peft_config(rank, alpha, rslora, peft_targets) -> peft.LoraConfig:
    modules = "|".join(target for target in peft_targets if isinstance(target, str)) or None
    parameters = [name for target in peft_targets if isinstance(target, list) for name in target] or None
    return peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=modules,
                           target_parameters=parameters, lora_dropout=0.0)


def peft_model(base, rank, alpha, rslora, peft_targets):
    """`base` with PEFT LoRA adapters, random A and B."""
    model = peft.get_peft_model(base, peft_config(rank, alpha, rslora, peft_targets))
    randomize_adapters(model)
    return model.eval()


def maxdpo_lora(path, cfg: LoraConfig, adapter_folder):
    """(spec, family, graphdef, params): the HF folder with the PEFT folder's adapters, as maxdpo loads them."""
    family, spec = spec_from_pretrained(path)
    lora = plan(spec, family, cfg)
    graphdef, abstract, _ = abstract_model(spec, Execution(lora=lora))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), split_adapters(abstract)[1])
    params = read_adapter(adapter_folder, spec, cfg, merge_trees(load_params(path, spec, family), zeros))
    return spec, family, graphdef, params


def logits(graphdef, params, ids=IDS):
    return np.asarray(nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))(jnp.asarray(ids)))


@pytest.mark.parametrize("family,targets,rslora", [
    ("llama", [ATTENTION, SOME_MLP], False),
    ("mistral", [ATTENTION], True),
    ("gemma", [ATTENTION, SOME_MLP], False),
    ("gemma2", [SOME_MLP], False),
    ("mixtral", [ATTENTION, EXPERTS, ROUTER], False),
    ("mixtral", [SOME_EXPERTS], True),  # layer 0's experts carry two adapters (PEFT nests them), layer 1's one
])
def test_lora_forward_adapter_folder_and_merged_export_equal_peft(tmp_path, family, targets, rslora):
    base = tiny_hf(tmp_path / "base", family)
    reference = peft_model(base, 4, 8.0, rslora, [peft_target for _, peft_target in targets])
    reference.save_pretrained(tmp_path / "theirs")
    expected = hf_logits(reference, IDS)
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=rslora, targets=[ours for ours, _ in targets])
    spec, fam, graphdef, params = maxdpo_lora(tmp_path / "base", cfg, tmp_path / "theirs")
    np.testing.assert_allclose(logits(graphdef, params), expected, atol=1e-4, rtol=0)

    # maxdpo's adapter folder loads in PEFT onto a fresh base with the same logits
    save_adapter(spec, cfg, params, tmp_path / "ours", str(tmp_path / "base"))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    fresh.config._attn_implementation = "eager"
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(loaded, IDS), expected, atol=1e-4, rtol=0)

    # the merged export is a plain HF model with the same logits
    lora = plan(spec, fam, cfg)
    save_params(spec, merge_adapters(params, lora), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    merged.config._attn_implementation = "eager"
    np.testing.assert_allclose(hf_logits(merged.eval(), IDS), expected, atol=1e-4, rtol=0)


def test_laser_style_targets_export_only_their_layers(tmp_path):
    base = tiny_hf(tmp_path / "base", "llama")
    reference = peft_model(base, 2, 4.0, False, [SOME_MLP[1]])
    reference.save_pretrained(tmp_path / "theirs")
    cfg = LoraConfig(rank=2, alpha=4.0, targets=[SOME_MLP[0]])
    spec, fam, _, params = maxdpo_lora(tmp_path / "base", cfg, tmp_path / "theirs")
    save_adapter(spec, cfg, params, tmp_path / "ours", "base")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    modules = [m for m in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj",
                           "model.layers.2.mlp.down_proj", "model.layers.0.self_attn.q_proj")
               if re.fullmatch(config["target_modules"], m)]
    assert modules == ["model.layers.0.mlp.gate_proj", "model.layers.2.mlp.down_proj"]


@pytest.mark.parametrize("targets,message", [
    ([r"lm_head"], "cannot carry an adapter"),
    ([r"experts\.0\."], "some experts of layer 0"),
    ([r"experts\.\d+\.w1"], "w1 \\(gate\\) and w3 \\(up\\) in different layers"),
    ([r"layers\.0\..*w[13]", r"layers\.1\..*w1"], "in different layers"),
    ([r"q_proj", r"nothing_here"], "match no adaptable weight"),
    ([], "match no adaptable weight"),
])
def test_targets_that_cannot_be_adapted_are_refused(tmp_path, targets, message):
    tiny_hf(tmp_path, "mixtral")
    family, spec = spec_from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=message):
        plan(spec, family, LoraConfig(rank=4, targets=targets))


def test_a_lora_run_trains_adapters_against_its_own_base_and_exports_both_forms(tmp_path):
    """A LoRA DPO run on an HF base with the bundled data: step 1 sees policy == reference (loss log 2, no
    reference weights exist), the base weights never move, it resumes exactly, and the export
    holds the merged model and a PEFT adapter folder that loads onto the base with the merged model's logits."""
    from maxdpo import train
    tiny_llama(tmp_path / "base")
    run = tmp_path / "run"
    args = [f"model.path={tmp_path / 'base'}", "model.overrides=null", "tokenizer.path=bundled:tiny/tokenizer",
            "trainer.max_steps=8", "trainer.batch_size=16", "trainer.log_every=1", "trainer.save_every=4",
            "data.eval=null", "optimizer.learning_rate=1e-2", "optimizer.schedule=constant", "lora.rank=4",
            "lora.alpha=8", r"lora.targets=['self_attn\.(q|v)_proj', 'layers\.[01]\.mlp']", f"run.output_dir={run}"]
    assert train.main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and abs(rows[0]["rewards/margins"]) < 1e-6

    # the base is untouched: the merged export minus its adapters' product is the base
    cfg = LoraConfig(rank=4, alpha=8.0, targets=[r"self_attn\.(q|v)_proj", r"layers\.[01]\.mlp"])
    spec, family, _, trained = maxdpo_lora(tmp_path / "base", cfg, run / "hf" / "adapter")
    base = load_params(tmp_path / "base", spec, family)
    merged = merge_adapters(trained, plan(spec, family, cfg))
    exported = load_params(run / "hf", spec, family)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(merged["layers"]["attn"]["q_proj"], base["layers"]["attn"]["q_proj"])
    np.testing.assert_array_equal(merged["layers"]["attn"]["k_proj"], base["layers"]["attn"]["k_proj"])

    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    fresh.config._attn_implementation = "eager"
    adapted = peft.PeftModel.from_pretrained(fresh, run / "hf" / "adapter").eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    plain.config._attn_implementation = "eager"
    np.testing.assert_allclose(hf_logits(adapted, IDS), hf_logits(plain.eval(), IDS), atol=1e-4, rtol=0)
    card = (run / "hf" / "README.md").read_text()
    assert "- lora\n" in card and "- lora: rank=4, alpha=8, rslora=False" in card and "in `adapter/`" in card

    # `python -m maxdpo.export` of the last checkpoint writes the same two forms
    from maxdpo import export
    assert export.main([str(run), str(tmp_path / "exported")]) == 0
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (run / "hf" / name).read_bytes(), name

    # resume from step 4 reproduces the uninterrupted run
    shutil.rmtree(run / "checkpoints" / "8")
    shutil.rmtree(run / "hf")
    whole = (run / "metrics.jsonl").read_text().splitlines()
    assert train.main(args) == 0
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}  # noqa: E731
                           for line in lines]
    assert strip((run / "metrics.jsonl").read_text().splitlines()) == strip(whole)


def test_adapters_alone_fit_a_batch_and_the_reference_stays_the_base():
    """20 steps on one batch of the default job's model with adapters on every projection: the loss falls from
    log 2 to under 0.2 while every base weight stays bitwise where it was (the reference is those weights with
    the adapters off, so its logps never change)."""
    from maxdpo.configure import load_config
    from maxdpo.program import build_train_program
    from maxdpo.sharding import make_mesh
    from maxdpo.weights import init_params
    from tools.bench import synthetic_batch
    cfg = load_config(None, ["lora.rank=8", "lora.targets=[proj]", "optimizer.learning_rate=1e-2",
                             "optimizer.schedule=constant"])
    program = build_train_program(cfg, make_mesh(cfg.mesh), 20)
    assert not program.reference_model  # no reference weights: the base serves
    with program.mesh_context():
        params = init_params(program, 0)
        base = jax.tree.map(np.asarray, split_adapters(params)[0])
        state = program.init_state(params)
        batch = jax.device_put(synthetic_batch(32, 32, 16, program.spec.vocab_size, False, False),
                               program.batch_sharding)
        losses = []
        for _ in range(20):
            state, metrics = program.train_step(state, None, batch)
            losses.append(float(metrics["loss"]))
        after = split_adapters(jax.tree.map(np.asarray, state["params"]))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[-1] < 0.2
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(after[0])):
        np.testing.assert_array_equal(a, b)
    assert np.abs(after[1]["layers"]["attn"]["q_proj_lora_b"]).max() > 0


@pytest.mark.parametrize("family,targets", [("llama", [ATTENTION, SOME_MLP]),
                                             ("mixtral", [ATTENTION, EXPERTS, ROUTER])])
def test_lora_dpo_metrics_and_gradient_equal_trl_with_a_peft_model(tmp_path, family, targets):
    """TRL's DPOTrainer on a PEFT LoRA model (its reference: the same model with the adapters disabled) against
    maxdpo's train step on the same adapters and batch: loss, every logged metric, and the adapters' gradient
    norm (Mixtral: adapters on attention, router and experts)."""
    import optax
    import trl
    from datasets import Dataset

    from maxdpo.data.sources import resolve_path
    from maxdpo.dpo.freeze import adapter_split
    from maxdpo.dpo.losses import LossHyper
    from maxdpo.dpo.step import LossSettings, make_train_step
    from tests.test_trl_parity import METRICS, ROWS, maxdpo_batch

    base = tiny_llama(tmp_path / "base") if family == "llama" else tiny_hf(tmp_path / "base", family)
    lora = peft_config(4, 8.0, False, [theirs for _, theirs in targets])
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=len(ROWS),
                         report_to=[], use_cpu=True, bf16=False, max_length=32)
    trainer = trl.DPOTrainer(model=base, ref_model=None, args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer, peft_config=lora)
    randomize_adapters(trainer.model)  # as if trained: policy and adapter-free reference differ
    trainer.model.save_pretrained(tmp_path / "theirs")
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    value = trainer.compute_loss(trainer.model, trl_batch)
    value.backward()
    grads = [p.grad.double() for p in trainer.model.parameters() if p.grad is not None]
    expected = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    expected.update(loss=value.item(), grad_norm=torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
    assert 0 < expected["rewards/accuracies"] < 1  # the adapters make policy and reference differ

    cfg = LoraConfig(rank=4, alpha=8.0, targets=[ours for ours, _ in targets])
    spec, family, graphdef, params = maxdpo_lora(tmp_path / "base", cfg, tmp_path / "theirs")
    split = adapter_split(params, plan(spec, family, cfg))
    # TRL adds a MoE model's router load-balancing loss with the architecture's coefficient
    settings = LossSettings("sigmoid", LossHyper(0.3, 0.0), 0.0, spec.router_aux_loss_coef)
    step = jax.jit(make_train_step(graphdef, settings, optax.sgd(1e-3),
                                   optax.constant_schedule(1e-3), 1, split, base_reference=True))
    state = {"step": np.int32(0), "params": params, "opt_state": optax.sgd(1e-3).init(split.trainable(params))}
    _, metrics = step(state, None, maxdpo_batch({k: v.numpy() for k, v in trl_batch.items()}))
    for name in METRICS + ("grad_norm",):
        assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name


@pytest.mark.parametrize("shape", [(48, 80), (3, 16, 24), (97 * 48,)])
def test_nf4_codes_scales_and_round_trip_equal_bitsandbytes(shape):
    """maxdpo's NF4 against bitsandbytes' quantize_4bit (blocksize 64, no double quantisation) on the same
    tensor: the same code table, packed codes and block scales; the round trip equals bitsandbytes' dequantize
    of the flattened tensor (its CPU dequantize of a 2-D tensor returns other values: error 2.0 where the 1-D
    round trip of the same codes is within 0.5, so the 1-D path is the reference)."""
    import bitsandbytes.functional as bnb

    from maxdpo.models import nf4
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    theirs, state = bnb.quantize_4bit(torch.from_numpy(w.copy()), blocksize=64, quant_type="nf4",
                                      compress_statistics=False)
    codes, absmax = nf4.quantize(jnp.asarray(w))
    np.testing.assert_array_equal(nf4.CODES, state.code.numpy())
    np.testing.assert_array_equal(np.asarray(codes), theirs.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    flat, flat_state = bnb.quantize_4bit(torch.from_numpy(w.reshape(-1).copy()), blocksize=64, quant_type="nf4",
                                         compress_statistics=False)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(codes, absmax, shape, jnp.float32)),
                                  bnb.dequantize_4bit(flat, flat_state).numpy().reshape(shape))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_qlora_stores_bitsandbytes_codes_and_computes_with_the_dequantised_base(tmp_path, family):
    """A QLoRA program loads the HF base into NF4 (each layer's weight, in maxdpo's layout, coded as
    bitsandbytes codes it; Mixtral's experts too), its forward equals the LoRA forward on the dequantised base,
    and training moves only the adapters (the codes stay)."""
    import bitsandbytes.functional as bnb

    from maxdpo.configure import load_config
    from maxdpo.models.lora import dequantize_base
    from maxdpo.program import build_train_program
    from maxdpo.sharding import make_mesh
    from maxdpo.weights import initial_params
    from tools.bench import synthetic_batch
    tiny_hf(tmp_path / "base", family)
    cfg = load_config(None, [f"model.path={tmp_path / 'base'}", f"model.family={family}", "model.overrides=null",
                             "tokenizer.path=null", "lora.rank=4", r"lora.targets=[self_attn]", "lora.quantize=nf4",
                             "optimizer.learning_rate=1e-2", "optimizer.schedule=constant"])
    program = build_train_program(cfg, make_mesh(cfg.mesh), 10)
    with program.mesh_context():
        params = initial_params(program)
        host = jax.tree.map(np.asarray, params)
        family, spec = spec_from_pretrained(tmp_path / "base")
        stored = load_params(tmp_path / "base", spec, family)
        for layer in range(spec.num_layers):
            theirs, state = bnb.quantize_4bit(torch.from_numpy(stored["layers"]["mlp"]["down_proj"][layer].copy()),
                                              blocksize=64, quant_type="nf4", compress_statistics=False)
            np.testing.assert_array_equal(host["layers"]["mlp"]["down_proj_nf4"][layer], theirs.numpy().reshape(-1))
            np.testing.assert_array_equal(host["layers"]["mlp"]["down_proj_absmax"][layer], state.absmax.numpy())
        assert "q_proj" not in host["layers"]["attn"]

        dequantised = dequantize_base(host, abstract_model(spec)[1])
        lora_graphdef = abstract_model(spec, Execution(lora=program.execution.lora))[0]
        np.testing.assert_array_equal(logits(program.graphdef, host), logits(lora_graphdef, dequantised))

        state = program.init_state(params)
        batch = jax.device_put(synthetic_batch(8, 16, 8, spec.vocab_size, False, False), program.batch_sharding)
        losses = []
        for _ in range(10):
            state, metrics = program.train_step(state, None, batch)
            losses.append(float(metrics["loss"]))
        after = jax.tree.map(np.asarray, state["params"])
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.1
    np.testing.assert_array_equal(after["layers"]["attn"]["q_proj_nf4"], host["layers"]["attn"]["q_proj_nf4"])


def test_a_precomputed_reference_of_a_lora_run_is_its_base(tmp_path):
    """reference.precompute with LoRA computes the table with the adapters off: the run logs what the
    on-device base reference gives."""
    from maxdpo import train
    args = ["trainer.max_steps=4", "trainer.batch_size=16", "trainer.log_every=1", "data.eval=null",
            "optimizer.learning_rate=1e-2", "lora.rank=4", "lora.targets=[proj]"]
    assert train.main(args + [f"run.output_dir={tmp_path / 'device'}"]) == 0
    assert train.main(args + ["reference.precompute=true", f"run.output_dir={tmp_path / 'table'}"]) == 0
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("device", "table")]
    for on_device, precomputed in zip(*rows):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert precomputed[name] == pytest.approx(on_device[name], rel=1e-5, abs=1e-6), name
