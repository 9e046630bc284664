"""Kernels under a device mesh: run per shard (shard_map) as the logical rules say, same numbers as the XLA path."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxdpo.kernels.attention_reference import attention_reference
from maxdpo.kernels.flash_attention import flash_attention
from maxdpo.kernels.partitioning import DEFAULT_RULES, logical_rules
from maxdpo.configure import load_config
from maxdpo.models.moe import ExpertAdapters, dense_experts, pallas_experts, route
from programs import train_steps

MESH = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2), ("data", "fsdp", "expert", "tensor"))


def _shard_map_in_specs(fn, *args) -> tuple:
    """in_specs of the one shard_map at the top of `fn`'s jaxpr."""
    (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "shard_map"]
    return eqn.params["in_specs"]


# rules (None: the default, outside any `logical_rules`) -> the q and k/v spec (B 4, N 4, K 2 on MESH)
ATTENTION_RULES = {
    "default": (None, P(("data", "fsdp"), None, "tensor", None)),
    "batch-fsdp": ({**DEFAULT_RULES, "batch": ["fsdp"]}, P("fsdp", None, "tensor", None)),
    "heads-unsplit": ({**DEFAULT_RULES, "heads": [], "kv_heads": []}, P(("data", "fsdp"), None, None, None)),
    # q heads take fsdp x tensor (4), k/v heads only fsdp (2 heads): both split over the common fsdp
    "heads-common-prefix": ({"batch": ["data"], "heads": ["fsdp", "tensor"], "kv_heads": ["fsdp", "tensor"]},
                            P("data", None, "fsdp", None)),
    # tensor taken by the batch first, so heads stay whole
    "batch-takes-tensor": ({**DEFAULT_RULES, "batch": ["data", "tensor"]}, P(("data", "tensor"), None, None, None)),
}


@pytest.mark.parametrize("name", list(ATTENTION_RULES))
def test_flash_attention_runs_per_shard_as_the_logical_rules_say(name):
    rules, tiles = ATTENTION_RULES[name]
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (4, 24, 4, 16))
    k, v = (jax.random.normal(key, (4, 24, 2, 16)) for key in keys[1:])
    positions = jnp.tile(jnp.arange(24, dtype=jnp.int32), (4, 1))
    segments = jnp.ones((4, 24), jnp.int32).at[2, 18:].set(0)

    def attend(fn):
        return lambda q, k, v: fn(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                                  kv_segment_ids=segments, scale=0.25, sliding_window=9)

    want = attend(attention_reference)(q, k, v)
    with jax.set_mesh(MESH), logical_rules(rules) if rules else contextlib.nullcontext():
        q, k, v = (jax.device_put(x, NamedSharding(MESH, P(("data", "fsdp")))) for x in (q, k, v))
        got = jax.jit(attend(flash_attention))(q, k, v)
        ids = P(tiles[0], None)
        assert _shard_map_in_specs(attend(flash_attention), q, k, v) == (tiles, tiles, tiles, ids, ids, ids, ids)
    np.testing.assert_allclose(got, want, atol=2e-5)


# rules -> (token spec, MLP-width axes) for 32 tokens and width 24 on MESH
EXPERT_RULES = {
    "default": (None, P(("data", "fsdp"), None), "tensor"),
    "mlp-fsdp": ({**DEFAULT_RULES, "batch": ["data"], "mlp": ["fsdp"]}, P("data", None), "fsdp"),
    "mlp-behind-batch": ({**DEFAULT_RULES, "mlp": ["fsdp"]}, P(("data", "fsdp"), None), None),  # fsdp taken
    "mlp-unsplit": ({**DEFAULT_RULES, "batch": ["tensor"], "mlp": ["tensor"]}, P("tensor", None), None),
}


@pytest.mark.parametrize("name", list(EXPERT_RULES))
def test_pallas_experts_run_per_shard_as_the_logical_rules_say(name):
    rules, tokens, width = EXPERT_RULES[name]
    keys = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(keys[0], (32, 16))
    gate, up = (0.3 * jax.random.normal(key, (4, 16, 24)) for key in keys[1:3])
    down = 0.3 * jax.random.normal(keys[3], (4, 24, 16))
    _, experts, weights = route(x @ jax.random.normal(keys[4], (16, 4)), 2)
    adapter_keys = jax.random.split(keys[5], 4)  # LoRA on the experts, rank 3: gate and up share A
    adapters = ExpertAdapters(*(0.3 * jax.random.normal(key, shape) for key, shape in zip(
        adapter_keys, [(4, 16, 3), (4, 3, 2, 24), (4, 24, 3), (4, 3, 16)])))

    def loss(fn):
        return lambda x, gate, up, down, adapters: jnp.sum(jnp.sin(
            fn(x, experts, weights, gate, up, down, jax.nn.silu, adapters)))

    args = (x, gate, up, down, adapters)
    want = jax.value_and_grad(loss(dense_experts), argnums=(0, 1, 2, 3, 4))(*args)
    with jax.set_mesh(MESH), logical_rules(rules) if rules else contextlib.nullcontext():
        got = jax.jit(jax.value_and_grad(loss(pallas_experts), argnums=(0, 1, 2, 3, 4)))(*args)
        assert _shard_map_in_specs(loss(pallas_experts), *args) == (
            tokens, tokens, tokens, P(None, None, width), P(None, None, width), P(None, width, None),
            P(), P(None, None, None, width), P(None, width, None), P())
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_training_with_pallas_attention_on_a_mesh_matches_xla():
    """The default job's program, 3 steps + evaluation on a data 2 x fsdp 2 x tensor 2 mesh: every metric as
    with XLA.

    Step 1's accuracy is left out: policy = reference there, so its margins are rounding noise."""
    args = ["trainer.max_steps=3", "trainer.batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
            "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0"]
    rows = {}
    for impl in ("xla", "pallas"):
        steps, final = train_steps(load_config(None, args + [f"model.attention={impl}"]), evaluate_at_end=True)
        rows[impl] = steps + [final]
        del rows[impl][0]["rewards/accuracies"]
    assert len(rows["xla"]) == len(rows["pallas"]) >= 4
    for want, got in zip(rows["xla"], rows["pallas"]):
        assert set(want) == set(got)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
