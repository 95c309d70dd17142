"""Presence: who is on a topic, compatible with phoenix.js ``Presence``.

In a joined channel::

    def join(self, topic, payload, socket):
        self.send("after_join")              # track/push are not allowed inside join
        return ok()

    def handle_info(self, msg, socket):
        if msg == "after_join":
            self.track(socket.assigns["user"], {"online_at": time.time()})
            self.push("presence_state", self.presence_list())
        return noreply()

``self.track(key, meta)`` adds an entry ``key`` -> ``meta`` for this channel on its topic,
``self.update(key, meta)`` replaces its meta (``meta`` may be a function old -> new),
``self.untrack(key)`` removes it; an entry also ends by itself when its channel ends, for any
reason (leave, stop, crash, disconnect, lost edge, dead worker).  ``presence_list(topic)`` /
``self.presence_list()`` return the Phoenix shape ``{key: {"metas": [meta, ...]}}``, each meta
carrying a unique ``"phx_ref"`` (and ``"phx_ref_prev"`` after an update).  Every change
reaches all subscribers of the topic as a ``presence_diff`` broadcast
``{"joins": {...}, "leaves": {...}}``, merged over ``DIFF_WINDOW`` seconds.

Design (docs/architecture.md, "Presence"): each worker OWNS the entries of its own channels.
Owners replicate on the one internal bus topic ``zchannels:presence`` (every worker
subscribes to it, so every worker holds a full replica and ``presence_list`` is complete
anywhere): ``delta`` messages carry each flushed change, ``state`` messages the owner's full
state every PRESENCE_ANNOUNCE_INTERVAL (bus/timing.py; a replica adopts it wholesale, so
missed deltas and late starters converge).  A replica drops an owner at once when the broker
reports it dead (WORKER_DOWN), and otherwise when it was silent for PRESENCE_OWNER_TIMEOUT,
unless its own heartbeats stopped coming back too (the bus is down: nobody is dropped).  Client
diffs come from the owner only; for a dead owner, the lowest live id that replicated it sends
the leave diff (and a join diff if that owner comes back after a bus outage).
"""
from __future__ import annotations

import base64
import builtins
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias, TypedDict

import orjson

from zchannels.bus import wire
from zchannels.bus.timing import PRESENCE_ANNOUNCE_INTERVAL, PRESENCE_OWNER_TIMEOUT
from zchannels.workers.payload import JSONObject

PRESENCE_TOPIC = "zchannels:presence"
PRESENCE_KEY = wire.topic_key(PRESENCE_TOPIC)
DIFF_WINDOW = 0.05      # seconds: changes on one topic within it go out as one presence_diff

_counter = itertools.count()
_tracker: "Tracker | None" = None   # this worker process's tracker (set by workers/runner.py)

Presences: TypeAlias = dict[str, dict[str, JSONObject]]  # {key: {phx_ref: meta}}


class PresenceEntry(TypedDict):
    """One key of a presence list: every meta tracked under it, each with its ``"phx_ref"``."""
    metas: list[JSONObject]


#: What ``presence_list`` returns (phoenix.js ``Presence``'s state): ``{key: {"metas": [...]}}``.
PresenceState: TypeAlias = dict[str, PresenceEntry]
#: ``update``'s meta: a new meta, or a function from the old meta to the new one.
MetaUpdate: TypeAlias = JSONObject | Callable[[JSONObject], JSONObject]


def new_ref() -> str:
    """16 url-safe characters: 64-bit ns time, 16 random bits, 16-bit counter (never reused)."""
    raw = (time.time_ns().to_bytes(8, "big") + os.urandom(2)
           + (next(_counter) & 0xFFFF).to_bytes(2, "big"))
    return base64.urlsafe_b64encode(raw).decode()


def shape(entries: Presences) -> PresenceState:
    """{key: {ref: meta}} -> the Phoenix shape {key: {"metas": [meta, ...]}} (empty keys skipped)."""
    return {key: {"metas": list(metas.values())} for key, metas in entries.items() if metas}


def merge_into(target: Presences, entries: Presences) -> None:
    for key, metas in entries.items():
        target.setdefault(key, {}).update(metas)


def remove_from(target: Presences, entries: Mapping[str, Iterable[str]]) -> None:
    for key, metas in entries.items():
        have = target.get(key)
        if have is not None:
            for ref in metas:
                have.pop(ref, None)
            if not have:
                del target[key]


def entries_not_in(entries: Presences, other: Presences) -> Presences:
    """The entries (by ref) of ``entries`` that ``other`` does not hold."""
    missing: Presences = {}
    for key, metas in entries.items():
        have = other.get(key, {})
        kept = {ref: meta for ref, meta in metas.items() if ref not in have}
        if kept:
            missing[key] = kept
    return missing


def apply_delta(replica: dict[str, Presences], topics: dict[str, Any]) -> None:
    """Apply one owner's replicated ``delta`` (per topic: joins with metas, leaves as refs)."""
    for topic, diff in topics.items():
        entries = replica.setdefault(topic, {})
        merge_into(entries, diff["joins"])
        remove_from(entries, {k: dict.fromkeys(refs) for k, refs in diff["leaves"].items()})
        if not entries:
            del replica[topic]


def _key(key: object) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"presence key must be a string or an int, got {key!r}")
    return str(key)


class Diff:
    """Joins and leaves of one topic waiting for the end of the merge window."""
    __slots__ = ("joins", "leaves")

    def __init__(self) -> None:
        self.joins: Presences = {}
        self.leaves: Presences = {}

    def payload(self) -> dict[str, PresenceState]:
        return {"joins": shape(self.joins), "leaves": shape(self.leaves)}


class Tracker:
    """The presence table of one worker: its own entries plus a replica of every other owner's."""

    def __init__(self, me: bytes, publish: Callable[[str, str, bytes], None],
                 call_later: Callable[[float, Callable[[], object]], Any],
                 clock: Callable[[], float] = time.monotonic):
        self.me = me.decode()
        self.publish, self.call_later, self.clock = publish, call_later, clock
        self.mine: dict[str, Presences] = {}                   # topic -> key -> ref -> meta
        self.by_proc: dict[Any, dict[str, str]] = {}           # channel proc -> key -> ref
        self.owners: dict[str, dict[str, Presences]] = {}      # owner id -> topic -> entries
        self.heard: dict[str, float] = {}                      # owner id -> last state message
        self.expired: set[str] = set()                         # owners dropped for silence
        self.knows: dict[str, set[str]] = {}                   # owner id -> owners it replicates
        self.self_heard = clock()                              # our own state came back (bus up)
        self.confirmed: dict[str, Presences] = {}              # our entries as the bus echoed them
        self.to_clients: dict[str, Diff] = {}                  # topic -> pending presence_diff
        self.to_replicas: dict[str, Diff] = {}                 # topic -> pending delta
        self.timer: Any = None
        # Reads the replication messages already waiting before a list is made (set by the
        # worker): a joining client's presence_state must hold every entry whose diff its edge
        # saw before forwarding the join, and those entries' deltas are queued by then.
        self.catch_up: Callable[[], None] = lambda: None
        self._catching_up = False

    # --- the owner side (called by the Channel methods) --------------------------------

    def track(self, proc: Any, key: object, meta: JSONObject | None) -> str:
        key = _key(key)
        keys = self.by_proc.setdefault(proc, {})
        if key in keys:
            raise ValueError(f"{key!r} is already tracked by this channel on {proc.topic!r}; use update()")
        meta = self._meta(meta)
        keys[key] = meta["phx_ref"]
        self._add(proc.topic, key, meta)
        return keys[key]

    def update(self, proc: Any, key: object, meta: MetaUpdate) -> str:
        key = _key(key)
        ref = self.by_proc.get(proc, {}).get(key)
        if ref is None:
            raise ValueError(f"{key!r} is not tracked by this channel on {proc.topic!r}; track() it first")
        old = self.mine[proc.topic][key][ref]
        if callable(meta):
            meta = meta({k: v for k, v in old.items() if k not in ("phx_ref", "phx_ref_prev")})
        new = self._meta(meta)
        new["phx_ref_prev"] = ref
        self._remove(proc.topic, key, old)
        self.by_proc[proc][key] = new["phx_ref"]
        self._add(proc.topic, key, new)
        return self.by_proc[proc][key]

    def untrack(self, proc: Any, key: object) -> bool:
        ref = self.by_proc.get(proc, {}).pop(_key(key), None)
        if ref is None:
            return False
        self._remove(proc.topic, _key(key), self.mine[proc.topic][_key(key)][ref])
        return True

    def drop_proc(self, proc: Any) -> None:
        """The channel ended: all its entries leave."""
        keys = self.by_proc.pop(proc, None)
        for key, ref in (keys or {}).items():
            self._remove(proc.topic, key, self.mine[proc.topic][key][ref])

    def list(self, topic: str) -> PresenceState:
        if not self._catching_up:   # a handler run by the catch-up may list too: read once
            self._catching_up = True
            try:
                self.catch_up()
            finally:
                self._catching_up = False
        merged: Presences = {}
        merge_into(merged, self.mine.get(topic, {}))
        for owner, topics in self.owners.items():
            merge_into(merged, topics.get(topic, {}))
        return shape(merged)

    @staticmethod
    def _meta(meta: object) -> JSONObject:
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"presence meta must be a dict, got {type(meta).__name__}")
        meta = {k: v for k, v in meta.items() if k not in ("phx_ref", "phx_ref_prev")}
        orjson.dumps(meta)   # TypeError now rather than at the next flush
        meta["phx_ref"] = new_ref()
        return meta

    def _add(self, topic: str, key: str, meta: JSONObject) -> None:
        self.mine.setdefault(topic, {}).setdefault(key, {})[meta["phx_ref"]] = meta
        for pending in (self.to_clients, self.to_replicas):
            pending.setdefault(topic, Diff()).joins.setdefault(key, {})[meta["phx_ref"]] = meta
        self._schedule()

    def _remove(self, topic: str, key: str, meta: JSONObject) -> None:
        remove_from(self.mine[topic], {key: {meta["phx_ref"]: meta}})
        if not self.mine[topic]:
            del self.mine[topic]
        for pending in (self.to_clients, self.to_replicas):
            pending.setdefault(topic, Diff()).leaves.setdefault(key, {})[meta["phx_ref"]] = meta
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None:
            self.timer = self.call_later(DIFF_WINDOW, self.flush)

    def flush(self) -> None:
        """Send the merged diffs: one presence_diff per topic to clients, one delta to replicas."""
        self.timer = None
        to_clients, self.to_clients = self.to_clients, {}
        to_replicas, self.to_replicas = self.to_replicas, {}
        for topic, diff in to_clients.items():
            self.publish(topic, "presence_diff", orjson.dumps(diff.payload()))
        if to_replicas:
            delta = {topic: {"joins": diff.joins, "leaves": {k: list(m) for k, m in diff.leaves.items()}}
                     for topic, diff in to_replicas.items()}
            self.publish(PRESENCE_TOPIC, "delta", orjson.dumps({"owner": self.me, "topics": delta}))

    # --- replication ------------------------------------------------------------------

    def announce(self) -> None:
        """The periodic full state of this owner (also our liveness for the other workers)."""
        self.publish(PRESENCE_TOPIC, "state", orjson.dumps(
            {"owner": self.me, "topics": self.mine, "knows": sorted(self.heard)}))

    def on_bus(self, event: str, data: bytes) -> None:
        msg = orjson.loads(data)
        owner, topics = msg["owner"], msg["topics"]
        if owner == self.me:
            if event == "state":
                self._bus_heard(topics)
            elif event == "delta":
                apply_delta(self.confirmed, topics)
            return
        if event == "state":
            self.heard[owner] = self.clock()
            self.knows[owner] = set(msg.get("knows", ()))
            if owner in self.expired:   # back after a bus outage: its entries join again
                self.expired.discard(owner)
                if self.elected(owner):
                    for topic, entries in topics.items():
                        self.to_clients.setdefault(topic, Diff()).joins.update(entries)
                    self._schedule()
            self.owners[owner] = topics
        elif event == "delta" and owner not in self.expired:
            self.heard.setdefault(owner, self.clock())
            apply_delta(self.owners.setdefault(owner, {}), topics)

    def _bus_heard(self, echoed: dict[str, Presences]) -> None:
        """Our own state came back through the bus (``echoed``: our entries when we sent it;
        our deltas sent after it come back after it).  After a silence (a broker restart),
        every other owner gets a full PRESENCE_OWNER_TIMEOUT from now to be heard again, rather
        than being dropped for the outage, and our client diffs that the outage may have swallowed
        are sent again: the difference between our entries now and those the bus last
        confirmed (phoenix.js applies a diff it already had without change)."""
        now = self.clock()
        if now - self.self_heard > 2 * PRESENCE_ANNOUNCE_INTERVAL:
            for owner in self.heard:
                self.heard[owner] = now
            # A heartbeat later, when the edges have resubscribed too.
            confirmed = self.confirmed
            self.call_later(PRESENCE_ANNOUNCE_INTERVAL, lambda: self._resend_since(confirmed))
        self.self_heard = now
        self.confirmed = echoed

    def _resend_since(self, confirmed: dict[str, Presences]) -> None:
        for topic in set(confirmed) | set(self.mine):
            was, now = confirmed.get(topic, {}), self.mine.get(topic, {})
            joins, leaves = entries_not_in(now, was), entries_not_in(was, now)
            if joins or leaves:
                diff = self.to_clients.setdefault(topic, Diff())
                merge_into(diff.joins, joins)
                merge_into(diff.leaves, leaves)
                self._schedule()

    def elected(self, owner: str) -> bool:
        """True on the live worker with the lowest id among those that replicated ``owner``:
        it speaks to clients for ``owner`` while ``owner`` cannot (a fresh worker, started
        after ``owner`` died, knows nothing of its entries and is never chosen)."""
        return self.me <= min((o for o in self.heard if owner in self.knows.get(o, ())), default=self.me)

    def expire(self) -> builtins.list[str]:
        """Drop owners silent for PRESENCE_OWNER_TIMEOUT while the bus was up.  Silence is counted
        up to the last time our own state came back, not up to now: when the bus goes down, no owner
        comes closer to the timeout, whichever of us announced last before it went."""
        dead = [o for o, t in self.heard.items() if self.self_heard - t > PRESENCE_OWNER_TIMEOUT]
        for owner in dead:
            self.owner_down(owner)
        return dead

    def owner_down(self, owner: str) -> None:
        """``owner`` is gone (silent too long, or the broker saw it die): its entries leave."""
        if owner == self.me or (owner not in self.heard and owner not in self.owners):
            return
        self.heard.pop(owner, None)
        self.expired.add(owner)
        topics = self.owners.pop(owner, {})
        if self.elected(owner):
            for topic, entries in topics.items():
                merge_into(self.to_clients.setdefault(topic, Diff()).leaves, entries)
            self._schedule()
        self.knows.pop(owner, None)


# --- the handler API (mixed into workers.api.Channel) ---------------------------------

class PresenceMixin:
    """``track`` / ``update`` / ``untrack`` / ``presence_list`` on a channel."""

    # Provided by workers.api.Channel.
    topic: str
    _proc: Any

    def track(self, key: str | int, meta: JSONObject | None = None) -> str:
        """Track ``key`` with ``meta`` on this channel's topic; returns the new ``phx_ref``.

        The entry lasts until ``untrack`` or the end of this channel.  Tracking a key this
        channel already tracks raises ``ValueError`` (use ``update``).  Not allowed in join.
        """
        return _runtime_tracker(self, "track").track(self._proc, key, meta)

    def update(self, key: str | int, meta: MetaUpdate) -> str:
        """Replace the meta of a tracked ``key`` (a dict, or a function old meta -> new meta).

        Clients see one diff with ``key`` in both joins (new meta, with ``phx_ref_prev``) and
        leaves (old meta).  Returns the new ``phx_ref``.
        """
        return _runtime_tracker(self, "update").update(self._proc, key, meta)

    def untrack(self, key: str | int) -> bool:
        """Stop tracking ``key`` for this channel; False if it was not tracked."""
        return _runtime_tracker(self, "untrack").untrack(self._proc, key)

    def presence_list(self) -> PresenceState:
        """Everyone on this channel's topic: ``{key: {"metas": [...]}}`` (all workers)."""
        return presence_list(self.topic)


def _runtime_tracker(channel: Any, what: str) -> Tracker:
    channel._joined(what)
    if _tracker is None:
        raise RuntimeError(f"{what}() works inside a worker process only")
    return _tracker


def presence_list(topic: str) -> PresenceState:
    """Everyone tracked on ``topic``, on every worker: ``{key: {"metas": [meta, ...]}}``.

    Push it as ``"presence_state"`` after each join; phoenix.js ``Presence`` needs it.
    """
    if _tracker is None:
        raise RuntimeError("presence_list() works inside a worker process only")
    return _tracker.list(topic)
