"""BCO against TRL's BCOTrainer (`trl.experimental.bco`; TRL 1.14 removed it, so the reference is TRL 1.13, run in a
subprocess beside this environment's TRL): two steps of two micro-batches with the learning rate at 0, so the
running reward mean δ moves over four micro-batches of the same model: the loss, δ, the pooled rewards and
logps and the gradient norm, as TRL logs them; evaluation reads δ without moving it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from hf_models import maxdpo_params, tiny_llama
from maxdpo.config import FreezeConfig
from maxdpo.data.batch import PAIRED, Batch
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.freeze import trainable_split
from maxdpo.dpo.losses import LossHyper
from maxdpo.dpo.step import LossSettings, finalize_metrics, make_eval_step, make_train_step
from maxdpo.dpo.unpaired import initial_moments
from maxdpo.models.registry import get_family
from test_kto_parity import UNPAIRED

TRL_WITH_BCO = "1.13.0"
BETA = 0.3


@pytest.fixture(scope="module")
def trl_with_bco() -> Path:
    """A folder holding TRL 1.13 alone (installed once, without dependencies: they are this environment's)."""
    target = Path(os.environ.get("MAXDPO_TEST_TRL_BCO") or Path.home() / ".cache" / "maxdpo-tests" /
                  f"trl-{TRL_WITH_BCO}")
    if not (target / "trl" / "experimental" / "bco").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"trl=={TRL_WITH_BCO}"], check=True)
    return target


def trl_bco(tmp: Path, trl_path: Path, calls: int) -> tuple[dict, list[dict]]:
    spec = {"policy": str(tmp / "policy"), "ref": str(tmp / "ref"), "tokenizer": resolve_path("bundled:tiny/tokenizer"),
            "rows": UNPAIRED + UNPAIRED[:6] * 2, "beta": BETA, "per_device": 6, "calls": calls, "output_dir": str(tmp / "trl")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(trl_path), str(Path(__file__).parent)]),
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    subprocess.run([sys.executable, str(Path(__file__).parent / "bco_reference.py"), str(tmp / "spec.json"),
                    str(tmp / "bco.npz")], check=True, env=env)
    with np.load(tmp / "bco.npz") as out:
        return {name: out[name] for name in out.files if name != "logged"}, json.loads(str(out["logged"]))


def maxdpo_batch(out: dict, calls: list[int]) -> Batch:
    """TRL's BCO batches as one maxdpo batch: [B, 2, T], side 0 the example, side 1 the one-token stub."""
    length = max(out[f"{call}/completion_input_ids"].shape[1] for call in calls)

    def padded(call, name):
        values = out[f"{call}/{name}"].astype(np.int32)
        return np.pad(values, ((0, 0), (0, length - values.shape[1])))

    def sides(values):  # [B, T] -> [B, 2, T]: the stub keeps the first token only, no completion
        stub = np.zeros_like(values)
        stub[:, 0] = values[:, 0]
        return np.stack([values, stub], axis=1)

    ids = np.concatenate([padded(c, "completion_input_ids") for c in calls])
    attention = np.concatenate([padded(c, "completion_attention_mask") for c in calls])
    completion = np.concatenate([padded(c, "completion_labels") != -100 for c in calls]) * attention
    labels = np.concatenate([out[f"{c}/label"] for c in calls])[:, None]
    segments = sides(attention)
    return Batch(input_ids=sides(ids), positions=np.maximum(np.cumsum(segments, -1) - 1, 0), segment_ids=segments,
                 completion_mask=np.stack([completion, np.zeros_like(completion)], axis=1),
                 pair_mask=np.ones_like(labels), layout=PAIRED, labels=labels)


def expected_step(logged: list[dict]) -> dict:
    """What TRL logs for a step of these compute_loss calls: the mean loss and δ, pooled sums over counts."""
    expected = {"loss": np.mean([row["loss"] for row in logged]), "delta": np.mean([row["delta"] for row in logged])}
    for side in ("chosen", "rejected"):
        count = sum(row.get(f"count/{side}", 0) for row in logged)
        for metric in ("rewards", "logps"):
            expected[f"{metric}/{side}"] = sum(row.get(f"{metric}/{side}_sum", 0.0) for row in logged) / count
    expected["rewards/margins"] = expected["rewards/chosen"] - expected["rewards/rejected"]
    return expected


def test_bco_steps_equal_trl(tmp_path, trl_with_bco):
    tiny_llama(tmp_path / "policy", seed=1)
    tiny_llama(tmp_path / "ref", seed=0)
    out, logged = trl_bco(tmp_path, trl_with_bco, calls=4)
    assert len({round(row["delta"], 6) for row in logged}) == 4  # δ moves with every micro-batch

    graphdef, params = maxdpo_params(tmp_path / "policy")
    _, ref_params = maxdpo_params(tmp_path / "ref")
    spec = nnx.merge(graphdef, params).spec
    settings = LossSettings("bco", LossHyper(BETA))
    split = trainable_split(spec, get_family(spec.family), FreezeConfig())
    tx = optax.sgd(0.0)  # the model stays as TRL's four calls see it
    step = jax.jit(make_train_step(graphdef, settings, tx, optax.constant_schedule(0.0), 2, split))
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(split.trainable(params)),
             "reward_moments": initial_moments()}
    for index, calls in enumerate(([0, 1], [2, 3])):
        state, metrics = step(state, ref_params, maxdpo_batch(out, calls))
        expected = expected_step(logged[calls[0]:calls[-1] + 1])
        if index == 0:
            expected["grad_norm"] = float(out["grad_norm"])
        for name, value in expected.items():
            assert float(metrics[name]) == pytest.approx(value, rel=2e-4, abs=1e-5), (index, name)
    assert float(state["reward_moments"]["count"]) == 4 * 6
    evaluated = finalize_metrics(jax.jit(make_eval_step(graphdef, settings))(
        state["params"], ref_params, maxdpo_batch(out, [0, 1]), state["reward_moments"]), settings)
    assert float(evaluated["delta"]) == pytest.approx(logged[-1]["delta"], rel=1e-5, abs=1e-6)
