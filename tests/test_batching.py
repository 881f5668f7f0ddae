import numpy as np
import pytest
import torch

from sab_byon_omni.data.batching import IGNORE_INDEX, collate, epoch_order, iterate_batches, micro_steps_per_epoch


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 96, size=int(rng.integers(3, 20))) for _ in range(n)]


def test_collate_pads_to_the_longest_row_and_masks_padding():
    data = [np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12])]
    b = collate(data, pad_id=0)
    assert b.input_ids.shape == (2, 5)
    assert b.input_ids[0].tolist() == [5, 6, 7, 0, 0]
    assert b.labels[0].tolist() == [5, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(b.labels[1], b.input_ids[1])  # labels are the input ids
    assert b.n_targets == 2 + 4


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert np.array_equal(epoch_order(50, 3, 7, True), epoch_order(50, 3, 7, True))
    assert not np.array_equal(epoch_order(50, 3, 7, True), epoch_order(50, 4, 7, True))
    assert np.array_equal(epoch_order(5, 0, 7, False), np.arange(5))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_disjoint_shards_that_cover_the_epoch(world):
    data = rows(37)
    seen = []
    for rank in range(world):
        for b in iterate_batches(data, 4, pad_id=0, epoch=1, seed=3, world=world, rank=rank):
            for r in range(b.input_ids.shape[0]):
                seen.append(tuple(b.labels[r][b.labels[r] != IGNORE_INDEX].tolist()))
    expected = [tuple(r.tolist()) for r in data]
    dropped = 37 - len(seen)
    assert dropped < world  # only a last chunk smaller than the world size is dropped
    assert len(set(seen)) == len(seen) and set(seen) <= set(expected)
    steps = micro_steps_per_epoch(37, 4, world)
    assert sum(1 for _ in iterate_batches(data, 4, pad_id=0, world=world, rank=0)) == steps


def test_resuming_from_a_cursor_continues_with_the_remaining_samples():
    data = rows(30)
    full = list(iterate_batches(data, 4, pad_id=0, epoch=0, seed=1))
    cursor = full[2].cursor
    rest = list(iterate_batches(data, 4, pad_id=0, epoch=0, seed=1, start=cursor))
    assert [b.cursor for b in rest] == [b.cursor for b in full[3:]]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rest, full[3:]))


def test_cursor_saved_with_two_ranks_resumes_on_one():
    data = rows(40)
    two = list(iterate_batches(data, 3, pad_id=0, epoch=0, seed=5, world=2, rank=0))
    cursor = two[2].cursor  # 3 global micro-steps of 6 samples
    assert cursor == 18
    order = epoch_order(40, 0, 5, True)
    one = list(iterate_batches(data, 3, pad_id=0, epoch=0, seed=5, start=cursor))
    got = [tuple(r[r != IGNORE_INDEX].tolist()) for b in one for r in b.labels]
    assert got == [tuple(data[i].tolist()) for i in order[18:]]


class Lengthy(list):
    """A list of rows that also carries their lengths (like the synthetic dataset)."""

    @property
    def lengths(self):
        return np.array([len(r) for r in self])


def test_length_bucket_size_is_a_deterministic_permutation_with_less_padding():
    data = Lengthy(rows(400, seed=2))
    order = epoch_order(400, 1, 9, True, data.lengths, bucket=64)
    assert sorted(order.tolist()) == list(range(400))
    assert np.array_equal(order, epoch_order(400, 1, 9, True, data.lengths, bucket=64))
    plain = epoch_order(400, 1, 9, True)
    for s in range(0, 400, 64):  # each run holds the same samples as without bucketing, sorted by length
        assert sorted(order[s:s + 64].tolist()) == sorted(plain[s:s + 64].tolist())
        assert list(data.lengths[order[s:s + 64]]) == sorted(data.lengths[plain[s:s + 64]])

    def padded(bucket):
        return sum(b.input_ids.numel() for b in iterate_batches(data, 4, pad_id=0, epoch=1, seed=9, bucket=bucket))
    real = sum(len(r) for r in data)
    assert padded(64) < real * 1.1 < padded(0)


@pytest.mark.parametrize("world", [1, 2])
def test_bucketed_shards_are_disjoint_cover_and_resume(world):
    data = Lengthy(rows(50, seed=4))
    seen = []
    for rank in range(world):
        for b in iterate_batches(data, 3, pad_id=0, epoch=0, seed=1, world=world, rank=rank, bucket=16):
            seen += [tuple(r[r != IGNORE_INDEX].tolist()) for r in b.labels]
    assert len(seen) == len(set(seen)) >= 50 - world + 1
    full = list(iterate_batches(data, 3, pad_id=0, epoch=0, seed=1, bucket=16))
    rest = list(iterate_batches(data, 3, pad_id=0, epoch=0, seed=1, bucket=16, start=full[4].cursor))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rest, full[5:]))
    # the order does not depend on the batch geometry: a cursor saved with 2 x 3 resumes on 1 x 5
    order = epoch_order(50, 0, 1, True, data.lengths, bucket=16)
    two = list(iterate_batches(data, 3, pad_id=0, epoch=0, seed=1, world=2, rank=0, bucket=16))
    one = list(iterate_batches(data, 5, pad_id=0, epoch=0, seed=1, bucket=16, start=two[2].cursor))
    got = [tuple(r[r != IGNORE_INDEX].tolist()) for b in one for r in b.labels]
    assert got == [tuple(data[i].tolist()) for i in order[two[2].cursor:]]
