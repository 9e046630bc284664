"""The DPO step against TRL's formulas computed in torch on the same transformers models."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import AutoTokenizer

import maxdpo
from hf_models import maxdpo_params, tiny_hf, tiny_llama
from maxdpo.config import OptimizerConfig
from maxdpo.configure import load_config
from maxdpo.data.batch import Batch, PAIRED, collate
from maxdpo.data.prefix_sharing import collate_shared
from maxdpo.data.sources import resolve_path
from maxdpo.data.tokenize import PairTokenizer
from maxdpo.config import FreezeConfig
from maxdpo.dpo.freeze import trainable_split
from maxdpo.dpo.losses import LossHyper
from maxdpo.dpo.optim import make_optimizer
from maxdpo.dpo.step import LossSettings, make_train_step, sequence_stats
from maxdpo.models.registry import get_family
from maxdpo.program import build_train_program
from maxdpo.sharding import make_mesh

ROWS = [
    {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"},
    {"prompt": "copy a b c :", "chosen": " a b c", "rejected": " a b"},
    {"prompt": "parity of 7 ?", "chosen": " odd", "rejected": " even"},
    {"prompt": "next after a ?", "chosen": " b", "rejected": " z y"},
]
BETA, SMOOTHING = 0.3, 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    policy_hf = tiny_llama(tmp / "policy", seed=0)
    ref_hf = tiny_llama(tmp / "ref", seed=1)  # a different reference model
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))
    pair_tokenizer = PairTokenizer(tokenizer, 32, 16)
    pairs = [pair_tokenizer(row["prompt"], row["chosen"], row["rejected"])[0] for row in ROWS]
    batch = collate([[pair] for pair in pairs], 16, 1, tokenizer.pad_token_id)
    return policy_hf, ref_hf, tmp, batch, pairs


def trl_reference(policy_hf, ref_hf, batch, aux_coef=0.0):
    """TRL's concatenated forward, logps, sigmoid loss (+ aux_coef x the MoE router loss) and logged metrics."""
    ids = torch.tensor(batch.input_ids, dtype=torch.long)
    pairs, _, seq = ids.shape
    concat = torch.cat([ids[:, 0], ids[:, 1]])  # TRL: chosen rows, then rejected rows
    attention = torch.tensor(np.concatenate([batch.segment_ids[:, 0], batch.segment_ids[:, 1]]))
    loss_mask = torch.tensor(np.concatenate([batch.completion_mask[:, 0], batch.completion_mask[:, 1]]))
    labels, loss_mask = concat[:, 1:], loss_mask[:, 1:].bool()

    def forward(model):
        output = model(input_ids=concat, attention_mask=attention, output_router_logits=bool(aux_coef))
        logits = output.logits[:, :-1]
        per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1), logits, output.get("aux_loss")

    with torch.no_grad():
        ref_logps, _, _ = forward(ref_hf)
    policy_hf.zero_grad()
    logps, logits, aux_loss = forward(policy_hf)
    pc, pr, rc, rr = logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:]
    h = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(BETA * h) * (1 - SMOOTHING) - F.logsigmoid(-BETA * h) * SMOOTHING
    loss = losses.mean() + (aux_coef * aux_loss if aux_coef else 0.0)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy_hf.parameters() if p.grad is not None))
    chosen_rewards, rejected_rewards = BETA * (pc - rc).detach(), BETA * (pr - rr).detach()
    expected = {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
        "logits/chosen": logits[:pairs][loss_mask[:pairs]].mean().item(),
        "logits/rejected": logits[pairs:][loss_mask[pairs:]].mean().item(),
        "grad_norm": grad_norm.item(),
    }
    if aux_coef:
        expected["aux_loss"] = aux_loss.item()
    return expected


def _step(graphdef, params, ref_params, batch, num_micro, tx_and_schedule=None, aux_coef=0.0):
    tx, schedule = tx_and_schedule or make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.01), 10)
    settings = LossSettings("sigmoid", LossHyper(BETA, SMOOTHING), router_aux_coef=aux_coef)
    spec = nnx.merge(graphdef, params).spec
    split = trainable_split(spec, get_family(spec.family), FreezeConfig())
    step = jax.jit(make_train_step(graphdef, settings, tx, schedule, num_micro, split))
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(split.trainable(params))}
    return step(state, ref_params, batch)


def test_metrics_equal_trl_definitions(setup):
    policy_hf, ref_hf, tmp, batch, _ = setup
    graphdef, params = maxdpo_params(tmp / "policy")
    _, ref_params = maxdpo_params(tmp / "ref")
    _, metrics = _step(graphdef, params, ref_params, batch, num_micro=1)
    expected = trl_reference(policy_hf, ref_hf, batch)
    assert 0 < expected["rewards/accuracies"] < 1  # the reference really differs
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)


def test_mixtral_router_aux_loss_enters_loss_and_gradients_as_in_trl(setup, tmp_path):
    _, _, _, batch, _ = setup
    policy_hf = tiny_hf(tmp_path / "policy", "mixtral", seed=0)
    ref_hf = tiny_hf(tmp_path / "ref", "mixtral", seed=1)
    graphdef, params = maxdpo_params(tmp_path / "policy")
    _, ref_params = maxdpo_params(tmp_path / "ref")
    _, metrics = _step(graphdef, params, ref_params, batch, num_micro=1, aux_coef=0.5)
    expected = trl_reference(policy_hf, ref_hf, batch, aux_coef=0.5)
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-5), name
    _, without = _step(graphdef, params, ref_params, batch, num_micro=1)
    assert float(metrics["loss"]) - float(without["loss"]) == pytest.approx(0.5 * expected["aux_loss"], rel=1e-5)


SGD = (optax.sgd(1.0), optax.constant_schedule(1.0))  # the update is the gradient itself


def _assert_same_step(expected, actual, metrics_rtol):
    """Two (state, metrics) step results agree: metrics to metrics_rtol, updated parameters to 1e-5."""
    (expected_state, expected_metrics), (state, metrics) = expected, actual
    for name in expected_metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=metrics_rtol, atol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state["params"], expected_state["params"])


def _assert_sgd_steps_agree(graphdef, params, ref_params, expected, actual, metrics_rtol):
    """SGD steps on (batch, num_micro) `expected` and `actual` give the same metrics and gradient."""
    _assert_same_step(*(_step(graphdef, params, ref_params, batch, num_micro=num_micro, tx_and_schedule=SGD)
                        for batch, num_micro in (expected, actual)), metrics_rtol)


def _loaded_sgd_step(models, batch, **runtime):
    """An SGD step of `models`/policy against `models`/ref, both loaded with the `runtime` model options."""
    graphdef, state = nnx.split(maxdpo.load_pretrained(models / "policy", **runtime))
    ref_params = nnx.to_pure_dict(nnx.split(maxdpo.load_pretrained(models / "ref", **runtime))[1])
    return _step(graphdef, nnx.to_pure_dict(state), ref_params, batch, 1, tx_and_schedule=SGD)


def test_gradient_accumulation_equals_full_batch(setup):
    _, _, tmp, batch, _ = setup
    graphdef, params = maxdpo_params(tmp / "policy")
    _, ref_params = maxdpo_params(tmp / "ref")
    _assert_sgd_steps_agree(graphdef, params, ref_params, (batch, 1), (batch, 2), metrics_rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_rows_give_the_step_of_one_pair_per_row(setup, tmp_path, family):
    """Two rows of two packed pairs each (plus an empty slot row) == four rows of one pair: same metrics and
    update, so segment ids keep attention, positions (incl. Gemma-2's sliding window) and logps per pair."""
    _, _, _, batch, pairs = setup
    tiny_hf(tmp_path / "policy", family, seed=0)
    tiny_hf(tmp_path / "ref", family, seed=1)
    graphdef, params = maxdpo_params(tmp_path / "policy")
    _, ref_params = maxdpo_params(tmp_path / "ref")
    packed = collate([[pairs[0], pairs[1]], [pairs[2], pairs[3]], []], 32, 2, pad_id=0)
    _assert_sgd_steps_agree(graphdef, params, ref_params, (batch, 1), (packed, 1), metrics_rtol=2e-5)


@pytest.mark.parametrize("family,attention", [("llama", "xla"), ("gemma2", "xla"), ("mistral", "pallas")])
def test_prefix_shared_rows_give_the_unshared_step(setup, tmp_path, family, attention):
    """`prompt | chosen | rejected` rows (two pairs in a row, one alone, an empty row, and a pair whose prompts
    differ after a common start) give the unshared step's metrics and update: attention (windows and
    soft-caps included, XLA and the flash kernel), positions and the first rejected token's predictor."""
    _, _, _, _, pairs = setup
    differing = dataclasses.replace(pairs[1], rejected=pairs[1].rejected.copy())
    differing.rejected[differing.rejected_prompt_len - 2] += 1  # the prompts part two tokens before their end
    pairs = pairs + [differing]
    tiny_hf(tmp_path / "policy", family, seed=0)
    tiny_hf(tmp_path / "ref", family, seed=1)
    unshared = collate([[pair] for pair in pairs], 32, 1, pad_id=0)
    shared = collate_shared([[pairs[0], pairs[1]], [pairs[2]], [], [pairs[3], pairs[4]]], 64, 2, pad_id=0)
    _assert_same_step(_loaded_sgd_step(tmp_path, unshared, attention=attention),
                      _loaded_sgd_step(tmp_path, shared, attention=attention), 2e-5)


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_vocab_projection_gives_the_same_step(setup, chunk):
    """model.logits_chunk: the loss's vocabulary projection in chunks of positions (recomputed in the backward
    pass) gives the unchunked step's metrics and update, also on prefix-shared rows."""
    _, _, tmp, batch, pairs = setup
    shared = collate_shared([[pairs[0], pairs[1]], [pairs[2], pairs[3]]], 64, 2, pad_id=0)
    for data in (batch, shared):
        _assert_same_step(_loaded_sgd_step(tmp, data, logits_chunk=0),
                          _loaded_sgd_step(tmp, data, logits_chunk=chunk), 1e-5)


def test_chunked_vocab_projection_never_holds_all_logits():
    """Vocab 32000, 8 sequences of 512: the step's compiled temporaries shrink by more than the fp32 logits
    (524 MB) minus one chunk's worth when projecting 64 positions at a time."""
    temps = {}
    for chunk in (0, 64):
        cfg = load_config(None, ["model.overrides.vocab_size=32000", "model.overrides.max_position_embeddings=512",
                                 f"model.logits_chunk={chunk}"])
        program = build_train_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), total_steps=1)
        batch = Batch.abstract(PAIRED, rows=4, length=512)

        def loss(params, batch):
            return sequence_stats(program.graphdef, params, batch)["logps"].sum()

        compiled = jax.jit(jax.grad(loss)).lower(program.abstract_state["params"], batch).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 8 * 512 * 32000 * 4
    assert temps[0] - temps[64] > 0.75 * logits_bytes, temps
