"""The TPU (Mosaic) kernels lower and compile for a real TPU target, ahead of time, on this CPU machine.

Needs libtpu (`pip install "jax[tpu]"`, part of the test extra); skipped where it is absent.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxdpo.kernels.flash_attention import flash_attention

pytestmark = [pytest.mark.tpu_aot,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")]


@pytest.fixture(scope="module")
def v5p_device():
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _compile(fn, sharding, *shapes):
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]
    return jax.jit(fn).lower(*args).compile()


def _attention_grads(head_dim, window, softcap):
    def grads(q, k, v, positions, segments):
        def loss(q, k, v):
            out = flash_attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                                  kv_segment_ids=segments, scale=head_dim ** -0.5, sliding_window=window,
                                  logit_softcap=softcap, backend="tpu", interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return grads


def _compile_attention(sharding, seq, heads, kv_heads, head_dim, window=None, softcap=None):
    return _compile(_attention_grads(head_dim, window, softcap), sharding,
                    ((1, seq, heads, head_dim), jnp.bfloat16), ((1, seq, kv_heads, head_dim), jnp.bfloat16),
                    ((1, seq, kv_heads, head_dim), jnp.bfloat16), ((1, seq), jnp.int32), ((1, seq), jnp.int32))


def test_flash_attention_compiles_for_v5p_with_memory_linear_in_sequence(v5p_device):
    """Llama-3-8B attention (32 heads / 8 kv heads, head_dim 128), forward + backward, bf16: doubling the
    sequence from 8192 to 16384 about doubles temporary memory (0.4 -> 0.8 GB); the reference's [T, T]
    logits alone would quadruple it (8.6 -> 34 GB)."""
    temps = []
    for seq in (8192, 16384):
        compiled = _compile_attention(v5p_device, seq, 32, 8, 128)
        assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[1] <= 2.1 * temps[0], temps


def test_gemma2_local_attention_compiles_for_v5p(v5p_device):
    """head_dim 256, 16 heads / 8 kv heads, window 4096, soft-cap 50."""
    compiled = _compile_attention(v5p_device, 4096, 16, 8, 256, window=4096, softcap=50.0)
    assert compiled.as_text().count("tpu_custom_call") == 3


def test_grouped_matmul_compiles_for_v5p(v5p_device):
    """Mixtral-8x7B experts (8, top-2, 4096 x 14336), 4096 tokens, bf16, forward + backward."""
    from tools.kernel_resources import compile_grouped_matmul

    compiled = compile_grouped_matmul(v5p_device, backend="tpu")
    assert compiled.as_text().count("tpu_custom_call") >= 9  # 3 forward, 3 d_lhs, 3 d_rhs


def test_the_train_program_for_a_tpu_topology_runs_the_mosaic_kernels():
    """A CPU process compiling the run's program for v5p builds the flash kernels for the target's devices
    (Mosaic custom calls), not the GPU kernels' interpreter that the host's default backend would pick."""
    from jax.experimental import topologies

    from maxdpo.compile import compile_program
    from maxdpo.configure import load_config

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    counts = {}
    for impl in ("xla", "pallas"):
        cfg = load_config(None, [f"model.attention={impl}", "mesh.data=1", "mesh.fsdp=4"])
        compiled, _ = compile_program(cfg, devices)
        counts[impl] = compiled.as_text().count("tpu_custom_call")
    # the scanned layer's attention: the policy's forward, dq and dk/dv, and the reference's forward
    assert counts["xla"] == 0 and counts["pallas"] >= 4, counts
