"""The batch schedule: determinism, epochs, buckets, packing, per-process shares, checkpointable position."""
import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from maxdpo.data.batch import collate
from maxdpo.data.loader import BatchBuilder, BatchPlan, batch_iterator, eval_schedule, pack_rows, training_schedule
from maxdpo.data.sources import resolve_path
from maxdpo.data.store import PairStore
from maxdpo.data.tokenize import PairTokenizer


@pytest.fixture(scope="module")
def store():
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))
    pair_tokenizer = PairTokenizer(tokenizer, 32, 16)
    texts = [pair_tokenizer.plain_texts(f"copy {' '.join('abcdefgh'[:1 + i % 8])} :",
                                        " " + " ".join("abcdefgh"[:1 + i % 8]), " z") for i in range(40)]
    pairs = [pair for pair, _ in pair_tokenizer.encode_many(texts, rendered=False)]
    return PairStore.from_pairs(pairs, list(range(40)))


def _plan(**overrides):
    return BatchPlan(**{"batch_size": 4, "epochs": 2, "seed": 3, "shuffle": True, "pad_id": 0, "max_length": 32,
                        **overrides})


def _pairs_of(schedule, step):
    rows = schedule.rows[step]
    return rows[rows >= 0].tolist()


def test_schedule_is_deterministic_and_reshuffled_per_epoch(store):
    first, again = training_schedule(store, _plan()), training_schedule(store, _plan())
    assert np.array_equal(first.rows, again.rows) and first.steps_per_epoch == (10, 10)
    epoch0 = sum((_pairs_of(first, s) for s in range(10)), [])
    epoch1 = sum((_pairs_of(first, s) for s in range(10, 20)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1
    assert not np.array_equal(training_schedule(store, _plan(seed=4)).rows, first.rows)
    assert sum((_pairs_of(training_schedule(store, _plan(shuffle=False)), s) for s in range(10)), []) == list(range(40))


def test_an_epochs_last_partial_batch_is_dropped(store):
    schedule = training_schedule(store, _plan(batch_size=6))
    assert schedule.steps_per_epoch == (6, 6) and schedule.epoch_at(9) == 1.5


def test_batches_pad_to_the_bucket_of_their_longest_row(store):
    schedule = training_schedule(store, _plan())
    for step in range(len(schedule)):
        longest = store.lengths[_pairs_of(schedule, step)].max()
        assert schedule.lengths[step] == (16 if longest <= 16 else 32)


def test_batch_layout(store):
    plan = _plan(shuffle=False)
    batch = BatchBuilder(store, training_schedule(store, plan), plan)(0)
    pair = store.pair(1)
    length = len(pair.chosen)
    assert batch.input_ids.shape == (4, 2, 16) and batch.pair_mask.tolist() == [[1], [1], [1], [1]]
    assert batch.input_ids[1, 0, :length].tolist() == pair.chosen.tolist() and not batch.input_ids[1, 0, length:].any()
    assert batch.segment_ids[1, 0].tolist() == [1] * length + [0] * (16 - length)
    assert batch.positions[1, 0, :length].tolist() == list(range(length))
    assert batch.completion_mask[1, 0].nonzero()[0].tolist() == list(range(pair.chosen_prompt_len, length))


def test_eval_covers_every_pair_once_with_filler_rows(store):
    plan = _plan(batch_size=6, shuffle=False)
    schedule = eval_schedule(store, plan)
    assert len(schedule) == 7 and sum((_pairs_of(schedule, s) for s in range(7)), []) == list(range(40))
    last = BatchBuilder(store, schedule, plan)(6)
    assert last.pair_mask[:, 0].tolist() == [1, 1, 1, 1, 0, 0] and not last.segment_ids[4:].any()


def test_next_fit_packing_respects_both_sides():
    lengths = np.asarray([[5, 2], [4, 8], [3, 3], [6, 1], [2, 2]])
    assert pack_rows(np.arange(5), lengths, 10) == [[0, 1], [2, 3], [4]]  # [0, 1, 2] would need 12 chosen tokens


def test_packed_rows_hold_whole_pairs_with_restarting_positions(store):
    plan = _plan(packing=True, batch_size=2)
    schedule = training_schedule(store, plan)
    assert schedule.rows.shape[2] >= 2  # several pairs per row
    packed = sum((_pairs_of(schedule, s) for s in range(schedule.steps_per_epoch[0])), [])
    assert len(packed) == len(set(packed)) and len(packed) > 0.8 * len(store)  # a pair at most once per epoch
    batch = BatchBuilder(store, schedule, plan)(0)
    for r, row in enumerate(schedule.rows[0]):
        for slot, index in enumerate(row):
            if index < 0:
                assert batch.pair_mask[r, slot] == 0
                continue
            pair = store.pair(index)
            for side, sequence in enumerate((pair.chosen, pair.rejected)):
                where = batch.segment_ids[r, side] == slot + 1
                assert batch.input_ids[r, side][where].tolist() == sequence.tolist()
                assert batch.positions[r, side][where].tolist() == list(range(len(sequence)))
        assert max(batch.segment_ids[r, 0].astype(bool).sum(), batch.segment_ids[r, 1].astype(bool).sum()) <= 32


def test_two_processes_cover_each_batch_disjointly_and_completely(store):
    """Process p builds rows [p*R/2, (p+1)*R/2): together exactly the global batch, padded alike."""
    for packing in (False, True):
        plan = _plan(packing=packing, batch_size=4)
        schedule = training_schedule(store, plan)
        halves = [BatchBuilder(store, schedule, plan, process_index=p, process_count=2) for p in range(2)]
        for step in range(len(schedule)):
            shares = [h.pair_indices(step) for h in halves]
            ids = [set(s[s >= 0].tolist()) for s in shares]
            assert not ids[0] & ids[1] and ids[0] | ids[1] == set(_pairs_of(schedule, step))
            assert halves[0](step).input_ids.shape == halves[1](step).input_ids.shape
    with pytest.raises(ValueError, match="batch of 4 rows does not split over 3 processes"):
        BatchBuilder(store, schedule, plan, process_index=0, process_count=3)


def test_iterator_resumes_mid_epoch_from_its_saved_state(store):
    plan = _plan()
    builder = BatchBuilder(store, training_schedule(store, plan), plan)
    iterator = batch_iterator(builder, "fp")
    seen = [next(iterator) for _ in range(13)]  # into the second epoch, with batches prefetched beyond
    state = iterator.state()
    assert state["grain"]["next_index"] == 13
    rest = [next(iterator) for _ in range(7)]
    resumed = batch_iterator(builder, "fp")
    resumed.restore(state, "the checkpoint")
    for expected in rest:
        got = next(resumed)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, expected)))
    assert len(seen) + len(rest) == 20
    with pytest.raises(ValueError, match="the checkpoint was written while training on other data"):
        batch_iterator(builder, "other").restore(state, "the checkpoint")


def test_collate_masks_prompt_tokens_out_of_the_loss(store):
    pair = store.pair(0)
    batch = collate([[pair]], 16, 1, pad_id=0)
    assert batch.completion_mask[0, 0, :pair.chosen_prompt_len].sum() == 0
    assert batch.completion_mask[0, 0].sum() == len(pair.chosen) - pair.chosen_prompt_len
