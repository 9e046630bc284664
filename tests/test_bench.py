"""tools/bench.py and the FLOP count behind its MFU."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxdpo import components
from maxdpo.config import load_config
from maxdpo.flops import dpo_step_flops, forward_flops_per_token, mean_visible_keys
from maxdpo.models.transformer import Transformer

SPEC = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "tools" / "bench.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.mark.parametrize("seq,window", [(7, None), (64, 1), (64, 10), (10, 64)])
def test_mean_visible_keys_counts_the_causal_window(seq, window):
    query, key = np.arange(seq)[:, None], np.arange(seq)[None, :]
    visible = (key <= query) & (query - key < (window or seq))
    assert mean_visible_keys(seq, window) == pytest.approx(visible.sum() / seq)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mixtral", {"num_experts": 4, "num_experts_per_tok": 4})])
def test_forward_flops_match_xla_cost_analysis(family, overrides):
    """Our matmul count vs XLA's count of the compiled forward (which also counts softmax, norms and the
    masked half of the attention scores: a few percent at this shape). Layers unscanned: XLA counts a
    loop body once. Mixtral routes every token to all 4 experts, so the dense path does exactly the counted
    expert work (XLA's cost model counts ragged_dot as dense, so it cannot check top-k < E)."""
    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=64, **overrides)
    cfg = load_config(None, [f"model.family={family}", "model.scan_layers=false", "model.moe_impl=dense",
                             *(f"model.overrides.{k}={v}" for k, v in shape.items())])
    spec = components.build_spec(cfg)
    graphdef, state = nnx.split(Transformer(spec, nnx.Rngs(0)))
    ids = jnp.zeros((2, 32), jnp.int32)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state).forward(ids)[0])
    counted = forward.lower(state, ids).compile().cost_analysis()["flops"]
    ours = 2 * 32 * forward_flops_per_token(spec, 32)
    assert ours == pytest.approx(counted, rel=0.08)


def test_bench_reports_a_step(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["trainer.batch_size=8", "--seq", "32", "--steps", "2", "--warmup", "1",
                       "--peak-tflops", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    spec = components.build_spec(load_config(None, []))
    assert result["rows"] == 8 and result["tokens_per_s"] == pytest.approx(8 * 2 * 32 / result["step_s"])
    assert result["model_tflops_per_step"] == pytest.approx(dpo_step_flops(spec, 8, 32) / 1e12)
    assert result["mfu"] == pytest.approx(result["achieved_tflops_per_device"])
    assert np.isfinite(result["loss"]) and result["compile_s"] > 0 and len(result["step_s_all"]) == 2


def test_bench_vs_trl_runs_both_sides(tmp_path):
    """tools/bench_vs_trl.py end to end at a few steps: both frameworks train and report a speed."""
    spec = importlib.util.spec_from_file_location("bench_vs_trl", Path(__file__).parents[1] / "tools" / "bench_vs_trl.py")
    bench_vs_trl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_vs_trl)
    out = tmp_path / "vs.json"
    assert bench_vs_trl.main(["--steps", "12", "--warmup", "5", "--batch", "8", "--json", str(out),
                              "--maxdpo", "data.prefix_sharing=true"]) == 0
    result = json.loads(out.read_text())
    assert result["trl"]["tokens_per_s"] > 0 and result["maxdpo"]["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["maxdpo"]["tokens_per_s"] / result["trl"]["tokens_per_s"])
    assert result["trl"]["steps"] == 7 and result["maxdpo"]["windows"] == 2  # steps 6-12; windows ending 10, 12
