"""The edge's view of one channel instance of one connection (connection x topic x join_ref).

A ``Connection`` (edge/connection.py) keeps its channels in its table, topic -> ``ChannelRef``;
the hub indexes the joined ones by worker, the fast lane by topic key (edge/hub.py,
edge/fastlane.py).  Only the connection adds a channel to its table or removes one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from zchannels.bus import wire

if TYPE_CHECKING:
    from zchannels.edge.connection import Connection
    from zchannels.edge.serializer import Message

JOINING, JOINED = 0, 1


class ChannelRef:
    __slots__ = ("conn", "topic", "key", "join_ref", "worker", "state", "intercept",
                 "replaces", "buffered", "early", "pending", "retry", "orphan", "recovery")

    def __init__(self, conn: "Connection", topic: str, join_ref: str | None):
        self.conn = conn
        self.topic = topic
        self.key = wire.topic_key(topic)
        self.join_ref = join_ref
        self.worker: bytes | None = None          # the worker holding it, once joined
        self.state = JOINING
        self.intercept: frozenset[str] = frozenset()
        self.replaces: str | None = None          # join_ref of a duplicate join's old instance
        self.buffered: list["Message"] | None = None    # pushes while joining
        self.early: list[wire.Broadcast] | None = None  # broadcasts while joining (edge/fastlane.py)
        # Refs (bus form) of pushes sent to the worker and not answered yet, oldest first: if
        # the instance is lost they get an error reply instead of phoenix.js's 10 s timeout.
        self.pending: dict[bytes, None] | None = None
        # The timer that sends the JOIN again if no worker answers it in time (edge/replace.py),
        # and the worker whose late ok to that second copy (or the first) is being ended: its
        # frames about this channel are dropped quietly, they are not an intruder's.
        self.retry = None
        self.orphan: bytes | None = None
        # Its recovery of history (edge/recovery.py), from its join until its broadcasts are
        # live: the replay, then the held broadcasts without duplicates.
        self.recovery = None
