"""When the supervisor restarts a slot whose worker died (OTP's intensity/period, made smaller).

A worker is *ready* once its event loop has beaten (workers/supervisor.py tells).  Losing a
worker that was serving is an outage: it is replaced at once, however often it happens, up to
`INTENSITY` deaths of one slot in `PERIOD` seconds.  A worker that dies before it was ready, or
past that intensity, is a crash loop: its slot waits `BACKOFF_MIN` doubled on each further crash,
up to `BACKOFF_MAX`, with jitter so slots do not restart in lockstep.  The backoff never leaves
the service without a worker to come for long: when no other slot has a worker running or a
restart due within `LAST_SLOT_MAX`, this slot waits at most that long.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Collection

BACKOFF_MIN = 0.1       # first delay after a crash at start, doubled on each further one
BACKOFF_MAX = 10.0
LAST_SLOT_MAX = 1.0     # longest wait when no other slot has a worker or a sooner restart
INTENSITY = 10          # deaths of ready workers of one slot within PERIOD s that still
PERIOD = 10.0           # restart at once; beyond, the slot backs off like a crash loop


class RestartPolicy:
    """Per slot: the current backoff, recent deaths of ready workers, and when it may restart."""

    def __init__(self) -> None:
        self.backoff: dict[int, float] = {}       # slot -> current backoff base
        self.ready_deaths: dict[int, deque] = {}  # slot -> times its ready workers died
        self.not_before: dict[int, float] = {}    # slot -> earliest restart (monotonic)

    def due(self, slot: int) -> float:
        """The earliest monotonic time the slot may get a new worker."""
        return self.not_before.get(slot, 0.0)

    def hold(self, slot: int, until: float) -> None:
        self.not_before[slot] = until

    def after_death(self, slot: int, ready: bool, planned: bool, busy: Collection[int],
                    slots: int, now: float) -> float:
        """Record that `slot`'s worker died; return the delay before its replacement starts.

        `ready`: its loop had beaten; `planned`: the supervisor stopped it (SIGHUP, SIGTTOU);
        `busy`: slots that have a worker process now; `slots`: how many slots there are."""
        if planned:
            delay = 0.0
        elif ready and not self._too_often(slot, now):
            delay = self.backoff[slot] = 0.0
        else:
            base = min(BACKOFF_MAX, max(BACKOFF_MIN, 2 * self.backoff.get(slot, 0.0)))
            self.backoff[slot] = base
            delay = base * random.uniform(1.0, 1.2)
            if delay > LAST_SLOT_MAX and self._last_hope(slot, busy, slots, now):
                delay = LAST_SLOT_MAX
        self.not_before[slot] = now + delay
        return delay

    def _too_often(self, slot: int, now: float) -> bool:
        deaths = self.ready_deaths.setdefault(slot, deque())
        deaths.append(now)
        while deaths[0] < now - PERIOD:
            deaths.popleft()
        return len(deaths) > INTENSITY

    def _last_hope(self, slot: int, busy: Collection[int], slots: int, now: float) -> bool:
        return not any(s in busy or self.due(s) <= now + LAST_SLOT_MAX
                       for s in range(slots) if s != slot)
