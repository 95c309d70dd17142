"""workers/restarts.py: when a dead worker's slot gets a new one (pure, the clock passed in)."""
from __future__ import annotations

import pytest

from zchannels.workers import restarts
from zchannels.workers.restarts import RestartPolicy


def crash_at_start(policy: RestartPolicy, slot: int, now: float, busy=(), slots: int = 2) -> float:
    return policy.after_death(slot, ready=False, planned=False, busy=busy, slots=slots, now=now)


def test_a_ready_worker_is_replaced_at_once_however_often_up_to_the_intensity():
    policy = RestartPolicy()
    for i in range(restarts.INTENSITY):
        assert policy.after_death(0, True, False, busy={1}, slots=2, now=100.0 + i * 0.1) == 0.0
    assert policy.after_death(0, True, False, busy={1}, slots=2, now=101.5) > 0.0   # a crash loop now
    # ... which the period forgets
    assert policy.after_death(0, True, False, busy={1}, slots=2, now=200.0) == 0.0


def test_crashes_at_start_back_off_exponentially_with_jitter_and_a_ready_death_resets_it():
    policy = RestartPolicy()
    for i, base in enumerate([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]):
        assert base <= crash_at_start(policy, 0, now=10.0 * i, busy={1}) <= base * 1.2
    assert policy.after_death(0, True, False, busy={1}, slots=2, now=500.0) == 0.0
    assert crash_at_start(policy, 0, now=501.0, busy={1}) <= 0.12


def test_the_last_slot_with_nothing_else_coming_waits_at_most_last_slot_max():
    policy = RestartPolicy()
    for i in range(8):
        crash_at_start(policy, 0, now=10.0 * i, busy={1})          # slot 0 is at 10 s of backoff
    assert crash_at_start(policy, 0, now=100.0, busy={1}) >= 10.0  # slot 1 is running
    crash_at_start(policy, 1, now=100.0)                           # slot 0 due only at ~110
    policy.backoff[1] = 10.0
    assert crash_at_start(policy, 1, now=101.0) == restarts.LAST_SLOT_MAX
    # a single slot is always the last one
    solo = RestartPolicy()
    assert max(crash_at_start(solo, 0, now=float(i), slots=1) for i in range(10)) == restarts.LAST_SLOT_MAX


def test_a_planned_stop_restarts_at_once_and_leaves_the_backoff_alone():
    policy = RestartPolicy()
    crash_at_start(policy, 0, now=1.0, busy={1})
    assert policy.after_death(0, False, True, busy={1}, slots=2, now=2.0) == 0.0
    assert policy.due(0) == 2.0
    assert 0.2 <= crash_at_start(policy, 0, now=3.0, busy={1}) <= 0.24


@pytest.mark.parametrize("slots", [2, 3])
def test_a_slot_due_soon_elsewhere_means_no_cap(slots):
    policy = RestartPolicy()
    policy.backoff[0] = 10.0
    policy.hold(1, 100.5)
    assert crash_at_start(policy, 0, now=100.0, busy=(), slots=slots) >= 10.0
