"""The epoch schedule: coverage, determinism, resume, per-process slices and static shapes."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing import plan as plan_lib
from bucketing import schedule

LENGTHS = np.random.default_rng(0).integers(20, 600, 203)
PLAN = plan_lib.make_plan(LENGTHS, strategy="optimal", num_buckets=5, batch_size=16, num_devices=4)


def test_every_example_appears_exactly_once_per_epoch():
  for epoch in range(3):
    batches = schedule.epoch_batches(PLAN, seed=7, epoch=epoch)
    assert len(batches) == PLAN.num_steps
    seen = np.concatenate([indices for _, indices in batches])
    real = np.sort(seen[seen != schedule.FILLER])
    np.testing.assert_array_equal(real, np.arange(LENGTHS.size))


def test_batches_have_their_buckets_static_shape_and_members():
  for bucket, indices in schedule.epoch_batches(PLAN, seed=0, epoch=0):
    assert indices.shape == (PLAN.batch_sizes[bucket],)
    real = indices[indices != schedule.FILLER]
    assert np.all(PLAN.bucket_of_example[real] == bucket)


def test_each_buckets_batches_take_its_own_batch_size():
  # A budget of 400 tokens: 8 rows at 10 (the bucket holds 8, under 400 // 10 = 40), 4 at 100.
  plan = plan_lib.make_plan([10] * 8 + [100] * 8, num_buckets=2, max_tokens=400)
  shapes = sorted((b, i.shape) for b, i in schedule.epoch_batches(plan, seed=0, epoch=0))
  assert shapes == [(0, (8,)), (1, (4,)), (1, (4,))]


def test_filler_rows_complete_only_the_last_batch_of_a_bucket():
  batches = schedule.epoch_batches(PLAN, seed=0, epoch=0)
  for bucket in range(PLAN.num_buckets):
    fillers = [int(np.sum(i == schedule.FILLER)) for b, i in batches if b == bucket]
    assert sum(fillers) == PLAN.filler_rows[bucket]
    assert sum(f > 0 for f in fillers) <= 1


def test_schedule_is_a_pure_function_of_seed_and_epoch():
  first = schedule.epoch_batches(PLAN, seed=3, epoch=2)
  again = schedule.epoch_batches(PLAN, seed=3, epoch=2)
  assert [b for b, _ in first] == [b for b, _ in again]
  for (_, a), (_, b) in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  other_epoch = schedule.epoch_batches(PLAN, seed=3, epoch=3)
  other_seed = schedule.epoch_batches(PLAN, seed=4, epoch=2)
  flatten = lambda batches: np.concatenate([i for _, i in batches])
  assert not np.array_equal(flatten(first), flatten(other_epoch))
  assert not np.array_equal(flatten(first), flatten(other_seed))


def test_buckets_are_interleaved_not_grouped():
  order = [bucket for bucket, _ in schedule.epoch_batches(PLAN, seed=0, epoch=0)]
  runs = sum(1 for _ in itertools.groupby(order))
  assert runs > 2 * PLAN.num_buckets


@settings(max_examples=40, deadline=None)
@given(start_epoch=st.integers(0, 2), start_step=st.integers(0, PLAN.num_steps))
def test_resume_yields_exactly_the_uninterrupted_tail(start_epoch, start_step):
  full = list(schedule.iterate(PLAN, seed=11, num_epochs=3))
  resumed = list(
    schedule.iterate(PLAN, seed=11, start_epoch=start_epoch, start_step=start_step, num_epochs=3)
  )
  offset = start_epoch * PLAN.num_steps + start_step
  assert len(resumed) == len(full) - offset
  for expected, got in zip(full[offset:], resumed, strict=True):
    assert (expected.epoch, expected.step, expected.bucket) == (got.epoch, got.step, got.bucket)
    np.testing.assert_array_equal(expected.indices, got.indices)


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_num_epochs_epochs_are_yielded_and_no_more(num_epochs):
  steps = list(schedule.iterate(PLAN, seed=0, num_epochs=num_epochs))
  assert len(steps) == num_epochs * PLAN.num_steps
  assert [step.epoch for step in steps[:: PLAN.num_steps]] == list(range(num_epochs))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_slices_tile_the_global_batch(process_count):
  global_steps = list(schedule.iterate(PLAN, seed=5, num_epochs=1))
  local = [
    list(schedule.iterate(PLAN, seed=5, num_epochs=1, process_index=p, process_count=process_count))
    for p in range(process_count)
  ]
  for step, global_batch in enumerate(global_steps):
    parts = [local[p][step] for p in range(process_count)]
    assert {part.bucket for part in parts} == {global_batch.bucket}
    np.testing.assert_array_equal(np.concatenate([p.indices for p in parts]), global_batch.indices)


def test_bad_positions_are_rejected():
  with pytest.raises(ValueError, match="start_step"):
    next(schedule.iterate(PLAN, 0, start_step=PLAN.num_steps + 1))
  with pytest.raises(ValueError, match="start_step -1 is outside"):
    next(schedule.iterate(PLAN, 0, start_step=-1))
  with pytest.raises(ValueError, match="process_index"):
    schedule.process_slice(np.arange(8), 2, 2)
  with pytest.raises(ValueError, match="does not split"):
    schedule.process_slice(np.arange(6), 0, 4)


def test_each_epoch_batches_other_sequences_together_not_the_same_batches_reordered():
  # One bucket of 8 sequences in batches of 4: without a shuffle inside the bucket every epoch
  # would hold the same two batches, {0..3} and {4..7}, only in another order.
  plan = plan_lib.make_plan([5] * 8, strategy="none", batch_size=4)
  batches = {
    frozenset(indices.tolist())
    for epoch in range(4)
    for _, indices in schedule.epoch_batches(plan, seed=0, epoch=epoch)
  }
  assert len(batches) > 2


def batch_lists(batches):
  return [(bucket, indices.tolist()) for bucket, indices in batches]


def test_the_next_seed_is_not_the_same_schedule_an_epoch_later():
  # Seeds 0 and 1 of a sweep must not train on each other's schedules, shifted by an epoch.
  plan = plan_lib.make_plan([5] * 8 + [50] * 8, num_buckets=2, batch_size=2)
  for seed, epoch in itertools.product(range(3), range(3)):
    later = schedule.epoch_batches(plan, seed=seed, epoch=epoch + 1)
    next_seed = schedule.epoch_batches(plan, seed=seed + 1, epoch=epoch)
    assert batch_lists(later) != batch_lists(next_seed), (seed, epoch)


def test_the_order_of_the_buckets_batches_is_reshuffled_every_epoch():
  # 4 batches of bucket 0 and 4 of bucket 1 can come in 70 orders; one order for every epoch would
  # put the same lengths at the same steps each epoch.
  plan = plan_lib.make_plan([5] * 8 + [50] * 8, num_buckets=2, batch_size=2)
  orders = {
    tuple(bucket for bucket, _ in schedule.epoch_batches(plan, seed=0, epoch=epoch))
    for epoch in range(4)
  }
  assert len(orders) > 1
