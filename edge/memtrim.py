"""Give the memory of big buffers back to the system soon after they are freed.

A connection that dies holding a megabyte of an unfinished frame frees it at once
(``wsproto``), but glibc's malloc keeps freed memory in its heap: a buffer that grew past
the mmap threshold once raises that threshold, later ones grow inside the heap, and the
heap's free pages stay in the process's RSS.  Three hundred such connections, seven times
over, left an edge 200 MB above its baseline with nothing alive to show for it.
``malloc_trim(0)`` returns every free page of every arena to the system.

It walks the heap, so it runs at most once per ``DELAY`` seconds, after a freed buffer of
at least ``MIN_BYTES``; on a C library without it (musl, macOS) this module does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

MIN_BYTES = 256 * 1024   # freeing less than this is left to malloc
DELAY = 1.0              # seconds: one trim for a whole wave of closing connections


def _load_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()
_scheduled_on: asyncio.AbstractEventLoop | None = None   # the loop a trim is waiting on
trims = 0                # trims done (the tests read it)


def freed(nbytes: int) -> None:
    """Note that a buffer of `nbytes` was just dropped; big ones schedule a trim."""
    global _scheduled_on
    if nbytes < MIN_BYTES or _malloc_trim is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:     # no loop (shutting down): nothing to schedule on
        return
    if _scheduled_on is not loop:
        _scheduled_on = loop
        loop.call_later(DELAY, _trim)


def _trim() -> None:
    global _scheduled_on, trims
    _scheduled_on = None
    trims += 1
    _malloc_trim(0)
