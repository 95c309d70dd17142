"""The event loop of a channel test: its clock jumps over time in which nothing can happen.

zchannels.testing runs the worker on this loop.  When the loop has nothing ready to run and
nothing outside it can wake it (no file descriptor is watched but the loop's own wake-up pipe,
and no executor job is pending), waiting in real time would change nothing: the clock jumps
to the next timer instead.  So ``send_after(30_000, ...)``, presence's diff window and a
``refute_push``'s 100 ms cost no real time, and timers still fire in order, each at the loop
time it was due.  Handler code that waits on real I/O (a database client's socket, a thread
from ``asyncio.to_thread``) watches a descriptor or runs in the executor, which stops the
jumps while it lasts: the loop waits in real time then.  (trio's autojump clock, for asyncio.)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class _JumpingSelector(selectors.DefaultSelector):
    """The loop's selector: a wait with a deadline becomes a clock jump when the loop is idle."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: JumpingLoop | None = None
        self.baseline = 0                 # descriptors the loop itself watches (its wake-up pipe)
        self.idle_waiters: list[asyncio.Future[None]] = []

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        ready = super().select(0)
        if ready:
            return ready
        if self.idle_waiters:   # settle(): everything ready has run
            for waiter in self.idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.idle_waiters.clear()
            return []
        loop = self.loop
        if loop is not None and timeout is not None and loop.may_jump(len(self.get_map()) - self.baseline):
            loop.offset += timeout
            return []
        return super().select(timeout)


class JumpingLoop(asyncio.SelectorEventLoop):
    """A selector event loop with a clock that jumps over idle time (``autojump``, on by
    default; off, it is an ordinary loop).  ``time()`` is the loop's clock."""


    def __init__(self, autojump: bool = True) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        selector.baseline = len(selector.get_map())
        self._selector_ref = selector
        self.autojump = autojump
        self.offset = 0.0
        self.executor_jobs = 0

    def time(self) -> float:
        return super().time() + self.offset

    def may_jump(self, watched: int) -> bool:
        """Whether the clock may jump: nothing but timers can wake the loop."""
        return self.autojump and watched <= 0 and self.executor_jobs == 0

    def run_in_executor(self, executor: concurrent.futures.Executor | None,
                        func: Callable[[Unpack[_Ts]], _T], *args: Unpack[_Ts]) -> asyncio.Future[_T]:
        future = super().run_in_executor(executor, func, *args)
        self.executor_jobs += 1
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _future: object) -> None:
        self.executor_jobs -= 1

    async def settle(self) -> None:
        """Return once everything ready to run has run (the loop is about to wait); no time
        passes."""
        waiter: asyncio.Future[None] = self.create_future()
        self._selector_ref.idle_waiters.append(waiter)
        await waiter
