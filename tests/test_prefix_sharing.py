"""data.prefix_sharing: rows `prompt | chosen | rejected` train like the unshared layout, and cost fewer tokens."""
import json

import numpy as np
import pytest

from maxdpo import train
from maxdpo.data.loader import BatchPlan, training_schedule
from maxdpo.data.prefix_sharing import collate_shared, shared_prompt_length
from maxdpo.data.store import PairStore
from maxdpo.data.tokenize import TokenizedPair


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_layout():
    pair = TokenizedPair(np.array([1, 5, 6, 7, 8, 9]), np.array([1, 5, 6, 7, 4]), 4, 4)
    assert shared_prompt_length(pair) == 4
    batch = collate_shared([[pair]], 16, 1, pad_id=0)
    np.testing.assert_array_equal(batch.input_ids[0, 0, :9], [1, 5, 6, 7, 8, 9, 4, 0, 0][:9])
    np.testing.assert_array_equal(batch.positions[0, 0, :7], [0, 1, 2, 3, 4, 5, 4])
    np.testing.assert_array_equal(batch.segment_ids[0, 0, :8], [4, 4, 4, 4, 5, 5, 6, 0])
    np.testing.assert_array_equal(batch.completion_mask[0, 0, :7], [0, 0, 0, 0, 1, 1, 0])
    assert batch.prefix_target[0, 0, 3] == 4 and np.sum(batch.prefix_target >= 0) == 1


def test_schedule_packs_shared_rows():
    pairs = [TokenizedPair(np.arange(12), np.concatenate([np.arange(8), [99, 98, 97]]), 8, 8)] * 6
    store = PairStore.from_pairs(pairs, list(range(6)))
    plan = BatchPlan(batch_size=1, epochs=1, seed=0, shuffle=False, pad_id=0, max_length=16, packing=True,
                     prefix_sharing=True)
    schedule = training_schedule(store, plan)
    assert schedule.rows.shape[-1] == 2 and int(schedule.lengths[0]) == 32  # 2 x (8 + 4 + 3) = 30 <= 32


@pytest.mark.parametrize("extra", [[], ["reference.precompute=true", "model.attention=pallas"]])
def test_training_with_prefix_sharing_matches_unshared(tmp_path, extra):
    """The default job (3 steps, evaluation): every metric as without sharing."""
    args = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3", "trainer.batch_size=8",
            "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0"]
    assert train.main(args + [f"run.output_dir={tmp_path / 'plain'}"]) == 0
    assert train.main(args + extra + ["data.prefix_sharing=true", f"run.output_dir={tmp_path / 'shared'}"]) == 0
    plain, shared = _rows(tmp_path / "plain"), _rows(tmp_path / "shared")
    del plain[0]["rewards/accuracies"], shared[0]["rewards/accuracies"]  # step 1: policy = reference, ties
    assert [sorted(r) for r in plain] == [sorted(r) for r in shared] and len(plain) == 4
    for a, b in zip(plain, shared):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
