"""Flash attention (GPU and TPU kernels, Pallas interpret mode) against the plain-JAX reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from maxdpo.kernels.attention_blocks import BlockSizes, MaskRule, block_visibility, visible, visible_ranges
from maxdpo.kernels.attention_reference import attention_reference
from maxdpo.kernels.flash_attention import default_block_sizes, flash_attention

# Small tiles so every case spans several blocks; the TPU kernels need 128-wide key tiles.
TEST_BLOCKS = {"gpu": BlockSizes(16, 16, 16, 32), "tpu": BlockSizes(8, 128, 16, 128)}


def _packed_ids(batch, seq):
    """Row 0: one sequence; row 1: three packed segments (positions restart) then padding (segment 0)."""
    positions = np.tile(np.arange(seq), (batch, 1))
    segments = np.ones((batch, seq), np.int32)
    if batch > 1:
        bounds = [0, seq // 3, seq // 2, seq - 5, seq]
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            positions[1, start:end] = np.arange(end - start)
            segments[1, start:end] = (index + 1) % 4  # last part is padding: segment 0
    return jnp.asarray(positions, jnp.int32), jnp.asarray(segments)


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], (batch, seq, heads, head_dim), jnp.float32)
    return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out.astype(out.dtype))


def _assert_kernel_matches_reference(backend, q, k, v, d_out, common):
    """fp32: outputs to 2e-5 and dq/dk/dv to 5e-5 of the reference."""
    kernel = lambda q, k, v: flash_attention(q, k, v, block_sizes=TEST_BLOCKS[backend], backend=backend,  # noqa: E731
                                             interpret=True, **common)
    reference = lambda q, k, v: attention_reference(q, k, v, **common)  # noqa: E731
    out, grads = _value_and_grads(kernel, q, k, v, d_out)
    ref_out, ref_grads = _value_and_grads(reference, q, k, v, d_out)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


CASES = {  # name: (batch, seq, heads, kv_heads, head_dim, causal, window, softcap)
    "causal_gqa_seq_not_block_multiple": (2, 50, 4, 2, 32, True, None, None),
    "mqa_window7_softcap": (2, 45, 4, 1, 32, True, 7, 30.0),
    "window_of_one": (1, 37, 2, 2, 16, True, 1, None),
    "bidirectional_segments": (2, 40, 2, 1, 32, False, None, None),
    "head_dim_64": (1, 33, 2, 1, 64, True, 16, None),
    "head_dim_256_gemma": (1, 24, 2, 1, 256, True, None, 50.0),
    "head_dim_80_padded": (1, 20, 3, 1, 80, True, None, None),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(backend, case):
    batch, seq, heads, kv_heads, head_dim, causal, window, softcap = CASES[case]
    q, k, v, d_out = _inputs(batch, seq, heads, kv_heads, head_dim)
    positions, segments = _packed_ids(batch, seq)
    common = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segments, kv_segment_ids=segments,
                  scale=head_dim ** -0.5, causal=causal, sliding_window=window, logit_softcap=softcap)
    _assert_kernel_matches_reference(backend, q, k, v, d_out, common)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bfloat16_error_is_that_of_bfloat16_reference(backend):
    """bf16 inputs: the kernel's error against fp32 is at most 1.5x the bf16 reference's own error (+1e-3)."""
    q, k, v, d_out = _inputs(2, 64, 4, 2, 64, dtype=jnp.bfloat16)
    positions, segments = _packed_ids(2, 64)
    common = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segments, kv_segment_ids=segments,
                  scale=0.125, sliding_window=24, logit_softcap=20.0)
    kernel = lambda q, k, v: flash_attention(q, k, v, block_sizes=TEST_BLOCKS[backend], backend=backend,  # noqa: E731
                                             interpret=True, **common)
    reference = lambda q, k, v: attention_reference(q, k, v, **common)  # noqa: E731
    exact = _value_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)), d_out)
    for got, bf16, want in zip(jax.tree.leaves(_value_and_grads(kernel, q, k, v, d_out)),
                               jax.tree.leaves(_value_and_grads(reference, q, k, v, d_out)), jax.tree.leaves(exact)):
        kernel_error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        reference_error = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - want)))
        assert kernel_error <= 1.5 * reference_error + 1e-3, (kernel_error, reference_error)


def _brute_force_tiles(rule, ids, block_q, block_k):
    mask = visible(rule, ids[0][:, :, None], ids[1][:, :, None], ids[2][:, None, :], ids[3][:, None, :])
    batch, q_len, kv_len = mask.shape
    return mask.reshape(batch, q_len // block_q, block_q, kv_len // block_k, block_k).any(axis=(2, 4))


@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_block_skipping_is_exact_for_one_sequence_and_safe_for_any(window):
    """Row 0 (one sequence): skipped tiles are exactly the fully masked ones. Packed rows and prefix-shared
    rows (positions restart after the prompt): no tile with a visible entry is skipped."""
    rule = MaskRule(True, window)
    positions, segments = _packed_ids(2, 96)
    ids = (positions, segments, positions, segments)
    table, brute = block_visibility(rule, *ids, 16, 8), _brute_force_tiles(rule, ids, 16, 8)
    np.testing.assert_array_equal(table[0], brute[0])
    assert bool(jnp.all(table | ~brute)) and int(jnp.sum(~table[1])) > 0
    _, _, _, (positions, segments), _ = _prefix_shared([(30, 20, 25), (9, 4, 3)], pad=5)
    shared_rule = MaskRule(True, window, shared_prefix=True)
    ids = (positions, segments, positions, segments)
    table, brute = block_visibility(shared_rule, *ids, 16, 8), _brute_force_tiles(shared_rule, ids, 16, 8)
    assert bool(jnp.all(table | ~brute)) and int(jnp.sum(~table)) > 0


def test_work_falls_with_the_window():
    """Visited key tiles for an 8k causal row at the default GPU tiles: causal ~ half, windows less."""
    seq, sizes = 8192, default_block_sizes("gpu", 8192, 8192, 128)
    positions = jnp.arange(seq, dtype=jnp.int32)[None]
    segments = jnp.ones_like(positions)
    visited = {}
    for window in (None, 4096, 1024, 128):
        table = block_visibility(MaskRule(True, window), positions, segments, positions, segments,
                                 sizes.block_q, sizes.block_k)
        ranges = visible_ranges(table)
        visited[window] = int(jnp.sum(ranges[..., 1] - ranges[..., 0]))
    full = (seq // sizes.block_q) * (seq // sizes.block_k)
    assert 0.5 < visited[None] / full < 0.52
    assert visited[None] > visited[4096] > visited[1024] > visited[128]
    assert visited[128] <= (seq // sizes.block_q) * (1 + (sizes.block_q + 128) // sizes.block_k)


def test_gpu_kernels_lower_to_triton_at_llama_shape():
    """Forward + backward at seq 2048, 32 heads / 8 kv heads, head_dim 128, bf16 lower to Triton kernels.

    jax.export lowers for CUDA without a GPU; Triton's own compile to PTX happens on the device.
    """
    def loss(q, k, v, positions, segments):
        out = flash_attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                              kv_segment_ids=segments, scale=128 ** -0.5, sliding_window=1024,
                              logit_softcap=50.0, backend="gpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))
    shape = jax.ShapeDtypeStruct
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(shape((1, 2048, 32, 128), jnp.bfloat16), shape((1, 2048, 8, 128), jnp.bfloat16),
      shape((1, 2048, 8, 128), jnp.bfloat16), shape((1, 2048), jnp.int32), shape((1, 2048), jnp.int32))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(1, 8, 3, 2, 16)
    positions, segments = _packed_ids(1, 8)
    with pytest.raises(ValueError, match="grouped-query"):
        flash_attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                        kv_segment_ids=segments, scale=1.0)


def _prefix_shared(lengths, seed=0, heads=4, kv_heads=2, head_dim=32, pad=3):
    """One row of (prompt | chosen | rejected) per pair, plus padding; and each pair's two separate sequences.

    Returns (q, k, v, positions, segments) of the shared row and, per pair, the (start, stop) of its chosen
    and rejected tokens with the separate (prompt | completion) tensors they must reproduce."""
    keys = iter(jax.random.split(jax.random.key(seed), 9 * len(lengths)))
    shared, separate = [[], [], []], []
    positions, segments, offset = [], [], 0
    for pair, (prompt, chosen, rejected) in enumerate(lengths, start=1):
        parts = [[jax.random.normal(next(keys), (n, h, head_dim)) for h in (heads, kv_heads, kv_heads)]
                 for n in (prompt, chosen, rejected)]
        for branch, n in enumerate((prompt, chosen, rejected)):
            for tensor, part in zip(shared, parts[branch]):
                tensor.append(part)
            start = 0 if branch == 0 else prompt
            positions.append(np.arange(start, start + n))
            segments.append(np.full(n, 4 * pair + branch))
        for branch, n in ((1, chosen), (2, rejected)):
            begin = offset + prompt + (chosen if branch == 2 else 0)
            alone = [jnp.concatenate([parts[0][i], parts[branch][i]])[None] for i in range(3)]
            separate.append(((begin, begin + n), alone, prompt))
        offset += prompt + chosen + rejected
    for tensor, size in zip(shared, (heads, kv_heads, kv_heads)):
        tensor.append(jnp.zeros((pad, size, head_dim)))
    positions.append(np.arange(pad))
    segments.append(np.zeros(pad))
    q, k, v = (jnp.concatenate(t)[None] for t in shared)
    ids = (jnp.asarray(np.concatenate(positions), jnp.int32)[None], jnp.asarray(np.concatenate(segments), jnp.int32)[None])
    return q, k, v, ids, separate


def test_shared_prefix_rows_equal_separate_sequences():
    """Reference with shared_prefix: each chosen/rejected token's output is that of its own (prompt | completion)
    sequence run alone; prompt tokens too."""
    q, k, v, (positions, segments), separate = _prefix_shared([(7, 5, 6), (4, 3, 2)])
    common = dict(scale=0.2, sliding_window=6)
    out = attention_reference(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                              kv_segment_ids=segments, shared_prefix=True, **common)
    for (start, stop), (q1, k1, v1), prompt in separate:
        alone_positions = jnp.arange(q1.shape[1], dtype=jnp.int32)[None]
        ones = jnp.ones_like(alone_positions)
        alone = attention_reference(q1, k1, v1, q_positions=alone_positions, kv_positions=alone_positions,
                                    q_segment_ids=ones, kv_segment_ids=ones, **common)
        np.testing.assert_allclose(out[0, start:stop], alone[0, prompt:], atol=1e-6)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_shared_prefix_kernel_matches_reference(backend):
    q, k, v, (positions, segments), _ = _prefix_shared([(9, 4, 7), (3, 6, 2), (12, 5, 5)], seed=1)
    d_out = jax.random.normal(jax.random.key(9), q.shape)
    common = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segments, kv_segment_ids=segments,
                  scale=0.2, logit_softcap=20.0, shared_prefix=True)
    _assert_kernel_matches_reference(backend, q, k, v, d_out, common)
