"""Broadcast history for message recovery: the store interface and its implementations
(memory, Redis Streams), read and written by the broker's sequencer."""
from __future__ import annotations

from zchannels.broker.history.memory import MemoryStore
from zchannels.broker.history.store import Store


def open_store(spec: str) -> Store:
    """``--history-store``: ``memory`` or ``redis://HOST:PORT/DB``; ValueError otherwise."""
    if spec == "memory":
        return MemoryStore()
    if spec.startswith("redis://"):
        from zchannels.broker.history.redisstore import RedisStore
        return RedisStore(spec)
    raise ValueError(f"--history-store must be memory or redis://HOST:PORT/DB, got {spec!r}")
