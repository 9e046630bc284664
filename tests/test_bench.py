"""tools/bench.py and the FLOP count behind its MFU."""
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxdpo.configure import load_config
from maxdpo.flops import forward_flops_per_token, mean_visible_keys
from maxdpo.models.transformer import Transformer
from maxdpo.program import architecture_from_config, execution_from_config

from tools import bench


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
    spec = architecture_from_config(cfg)
    graphdef, state = nnx.split(Transformer(spec, nnx.Rngs(0), execution_from_config(cfg)))
    ids = jnp.zeros((2, 32), jnp.int32)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state).forward(ids)[0])
    counted = forward.lower(state, ids).compile().cost_analysis()["flops"]
    ours = 2 * 32 * forward_flops_per_token(spec, 32)
    assert ours == pytest.approx(counted, rel=0.08)


def test_bench_reports_a_step(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["trainer.batch_size=8", "--seq", "32", "--steps", "3", "--warmup", "1",
                       "--peak-tflops", "0.25", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 8 and result["seq"] == 32 and result["devices"] == jax.device_count() == 8
    assert len(result["step_s_all"]) == 3 and result["step_s"] == pytest.approx(statistics.median(result["step_s_all"]))
    assert result["tokens_per_s"] == pytest.approx(8 * 2 * 32 / result["step_s"])  # chosen + rejected, all real
    # The default job's Llama by hand (vocab 64, hidden 128, mlp 256, 3 layers, 4 query / 2 kv heads of 16):
    # per token 2 x (q,k,v,o + gate,up,down weights + lm_head) + 4 x heads x head_dim x 16.5 mean causal keys
    # per layer; policy forward + backward (3 passes) and the reference forward on 8 x 2 x 32 tokens.
    weights = 3 * (128 * 16 * (4 + 2 + 2 + 4) + 3 * 128 * 256) + 128 * 64
    per_token = 2 * weights + 3 * 4 * 4 * 16 * (32 + 1) / 2
    assert result["model_tflops_per_step"] == pytest.approx(4 * 8 * 2 * 32 * per_token / 1e12, rel=1e-9)
    assert result["peak_tflops_per_device"] == 0.25
    assert result["mfu"] == pytest.approx(result["model_tflops_per_step"] / result["step_s"] / 8 / 0.25)
    assert np.isfinite(result["loss"]) and result["compile_s"] > 0


def test_bench_vs_trl_runs_both_sides(tmp_path):
    """tools/bench_vs_trl.py end to end at a few steps: both frameworks train and report a speed."""
    from tools import bench_vs_trl  # torch and trl: imported only here
    out = tmp_path / "vs.json"
    start = time.perf_counter()
    assert bench_vs_trl.main(["--steps", "12", "--warmup", "5", "--batch", "8", "--json", str(out),
                              "--maxdpo", "data.prefix_sharing=true"]) == 0
    elapsed = time.perf_counter() - start
    result = json.loads(out.read_text())
    # Each side's speed is a median of rates, each one step's (TRL) or one 5-step window's (maxdpo) real tokens
    # over its wall time, which lies inside this call; a step has 8 pairs x 2 sequences of >= 4 real tokens
    # (the bundled rows tokenize to 6-11).
    for side, per_rate in (("trl", 1), ("maxdpo", 5)):
        assert 8 * 2 * 4 * per_rate / elapsed < result[side]["tokens_per_s"], side
    assert result["ratio"] == pytest.approx(result["maxdpo"]["tokens_per_s"] / result["trl"]["tokens_per_s"])
    assert result["trl"]["steps"] == 7 and result["maxdpo"]["windows"] == 2  # steps 6-12; windows ending 10, 12


def test_bench_vs_peers_times_maxdpo_on_the_shared_batches(tmp_path):
    """tools/bench_vs_peers.py with no peer (their venvs need the package index): maxdpo's side loads the HF
    folder, trains on the shared batches and reports every timed step; the first loss is log 2 (the policy is
    its own reference) and training lowers it."""
    from tools import bench_vs_peers  # torch and transformers: imported only here
    out = tmp_path / "peers.json"
    assert bench_vs_peers.main(["--peers", "--steps", "3", "--warmup", "1", "--pairs", "8", "--prompt-len", "8",
                                "--completion-len", "8", "--hidden", "64", "--layers", "2", "--heads", "4",
                                "--head-dim", "16", "--intermediate", "128", "--vocab", "512",
                                "--json", str(out)]) == 0
    side = json.loads(out.read_text())["sides"]["maxdpo"]
    assert len(side["step_s_all"]) == 3 and side["step_s"] == pytest.approx(statistics.median(side["step_s_all"]))
    assert side["tokens_per_s"] == pytest.approx(8 * 2 * 16 / side["step_s"])
    assert len(side["losses"]) == 4 and side["losses"][0] == pytest.approx(np.log(2), abs=1e-6)
    assert side["losses"][-1] < side["losses"][0]
