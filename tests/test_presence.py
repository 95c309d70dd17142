"""Presence (workers/presence.py): the tracker's state/diff/merge logic on its own, then real
phoenix.js `Presence` objects under Node against a cluster of real processes."""
from __future__ import annotations

import os
import signal
import time
import uuid

import orjson
import pytest

from zchannels.bus.timing import PRESENCE_ANNOUNCE_INTERVAL, PRESENCE_OWNER_TIMEOUT
from tests.conftest import wait_until
from zchannels.workers import presence
from zchannels.workers.presence import Tracker, new_ref


# ---- unit: one tracker, fake bus and clock ----------------------------------------------------

class Proc:
    def __init__(self, topic: str):
        self.topic = topic


class Bus:
    """Collects what trackers publish; timers fire only when `fire()` is called."""

    def __init__(self):
        self.sent: list[tuple[str, str, dict]] = []
        self.timers: list = []
        self.now = 0.0

    def publish(self, topic, event, data):
        self.sent.append((topic, event, orjson.loads(data)))

    def call_later(self, delay, fn):
        self.timers.append(fn)
        return fn

    def fire(self):
        timers, self.timers = self.timers, []
        for fn in timers:
            fn()

    def tracker(self, me: bytes) -> Tracker:
        return Tracker(me, self.publish, self.call_later, clock=lambda: self.now)

    def diffs(self, topic="room:1"):
        return [p for t, e, p in self.sent if t == topic and e == "presence_diff"]


def test_refs_are_unique_16_char_url_safe_strings():
    refs = {new_ref() for _ in range(10_000)}
    assert len(refs) == 10_000
    assert all(len(r) == 16 and "+" not in r and "/" not in r for r in refs)


def test_track_lists_phoenix_shape_and_sends_one_merged_diff_per_window():
    bus = Bus()
    t = bus.tracker(b"w1")
    a, b = Proc("room:1"), Proc("room:1")
    ref_a = t.track(a, "ann", {"tab": 1})
    t.track(b, "ann", {"tab": 2})
    t.track(Proc("room:1"), 7, {})
    listed = t.list("room:1")
    assert set(listed) == {"ann", "7"}
    assert [m["tab"] for m in listed["ann"]["metas"]] == [1, 2]
    assert listed["ann"]["metas"][0]["phx_ref"] == ref_a
    assert len(bus.timers) == 1 and bus.diffs() == []
    bus.fire()
    [diff] = bus.diffs()
    assert set(diff["joins"]) == {"ann", "7"} and diff["leaves"] == {}
    assert len(diff["joins"]["ann"]["metas"]) == 2
    with pytest.raises(ValueError):
        t.track(a, "ann", {})


def test_update_is_one_diff_with_the_key_in_joins_and_leaves():
    bus = Bus()
    t = bus.tracker(b"w1")
    p = Proc("room:1")
    old = t.track(p, "ann", {"status": "away"})
    bus.fire()
    new = t.update(p, "ann", lambda meta: {**meta, "status": "busy"})
    bus.fire()
    diff = bus.diffs()[-1]
    [joined] = diff["joins"]["ann"]["metas"]
    [left] = diff["leaves"]["ann"]["metas"]
    assert joined == {"status": "busy", "phx_ref": new, "phx_ref_prev": old}
    assert left["phx_ref"] == old
    assert t.list("room:1") == {"ann": {"metas": [joined]}}


def test_untrack_and_channel_end_leave_and_empty_topics_vanish():
    bus = Bus()
    t = bus.tracker(b"w1")
    p, q = Proc("room:1"), Proc("room:1")
    t.track(p, "ann", {})
    t.track(q, "bob", {})
    bus.fire()
    assert t.untrack(p, "ann") and not t.untrack(p, "ann")
    t.drop_proc(q)
    t.drop_proc(q)   # idempotent
    bus.fire()
    diff = bus.diffs()[-1]
    assert set(diff["leaves"]) == {"ann", "bob"} and diff["joins"] == {}
    assert t.list("room:1") == {} and t.mine == {}


def replicate(bus: Bus, *trackers: Tracker):
    """Deliver everything published on the replication topic to every tracker (self included)."""
    msgs = [(e, p) for topic, e, p in bus.sent if topic == presence.PRESENCE_TOPIC]
    bus.sent = [s for s in bus.sent if s[0] != presence.PRESENCE_TOPIC]
    for event, payload in msgs:
        for t in trackers:
            t.on_bus(event, orjson.dumps(payload))


def test_replicas_converge_from_deltas_and_from_full_state_of_a_late_worker():
    bus = Bus()
    w1, w2 = bus.tracker(b"w1"), bus.tracker(b"w2")
    p = Proc("room:1")
    t_ref = w1.track(p, "ann", {"x": 1})
    w2.track(Proc("room:1"), "bob", {})
    bus.fire()
    replicate(bus, w1, w2)
    assert w1.list("room:1") == w2.list("room:1")
    assert set(w2.list("room:1")) == {"ann", "bob"}
    w1.update(p, "ann", {"x": 2})
    bus.fire()
    replicate(bus, w1, w2)
    assert w2.list("room:1")["ann"]["metas"][0]["phx_ref_prev"] == t_ref
    late = bus.tracker(b"w3")   # missed every delta: the next full state is enough
    w1.announce()
    w2.announce()
    replicate(bus, late)
    assert late.list("room:1") == w1.list("room:1")


def test_silent_owner_is_dropped_and_only_the_lowest_live_id_sends_the_leave():
    bus = Bus()
    w1, w2, w3 = bus.tracker(b"w1"), bus.tracker(b"w2"), bus.tracker(b"w3")
    w3.track(Proc("room:1"), "cat", {})
    bus.fire()
    for t in (w1, w2, w3):
        t.announce()
    replicate(bus, w1, w2, w3)
    bus.sent.clear()
    bus.now = 2.0   # w1 and w2 still announce; w3 was killed
    for t in (w1, w2):
        t.announce()
    replicate(bus, w1, w2)
    assert w1.expire() == []
    bus.now = 3.0
    for t in (w1, w2):
        t.announce()
    replicate(bus, w1, w2)
    assert w1.expire() == ["w3"] and w2.expire() == ["w3"]
    bus.fire()
    [diff] = bus.diffs()   # once, from w1
    assert set(diff["leaves"]) == {"cat"}
    assert w1.list("room:1") == w2.list("room:1") == {}


def test_an_owner_the_broker_saw_die_leaves_at_once():
    bus = Bus()
    w1, w2, w3 = bus.tracker(b"w1"), bus.tracker(b"w2"), bus.tracker(b"w3")
    w3.track(Proc("room:1"), "cat", {})
    bus.fire()
    for _ in range(2):   # the second round tells who replicates whom
        for t in (w1, w2, w3):
            t.announce()
        replicate(bus, w1, w2, w3)
    bus.sent.clear()
    for t in (w1, w2):   # WORKER_DOWN from the broker, long before OWNER_TIMEOUT
        t.owner_down("w3")
        t.owner_down("w3")      # told twice: nothing more
        t.owner_down("nobody")  # never heard of: nothing
    bus.fire()
    [diff] = bus.diffs()   # once, from w1
    assert set(diff["leaves"]) == {"cat"}
    assert w1.list("room:1") == w2.list("room:1") == {}
    assert w1.expire() == []


def bob_tracked_on_w2() -> tuple[Bus, Tracker, Tracker]:
    bus = Bus()
    w1, w2 = bus.tracker(b"w1"), bus.tracker(b"w2")
    w2.track(Proc("room:1"), "bob", {})
    bus.fire()
    return bus, w1, w2


def test_no_owner_is_dropped_while_the_bus_itself_is_silent():
    bus, w1, w2 = bob_tracked_on_w2()
    w1.announce()
    w2.announce()
    replicate(bus, w1, w2)
    bus.sent.clear()
    bus.now = 10.0   # broker restart: nothing came through, our own state neither
    assert w1.expire() == []
    assert set(w1.list("room:1")) == {"bob"}
    # The bus is back and our own state returns before w2's: w2 gets a full timeout from now.
    w1.announce()
    replicate(bus, w1)
    bus.now = 12.0
    assert w1.expire() == []
    w2.announce()
    replicate(bus, w1, w2)
    bus.now = 14.0
    assert w1.expire() == [] and set(w1.list("room:1")) == {"bob"}
    bus.fire()
    assert bus.diffs() == [], "a broker restart must not show clients any leave or join"


def test_an_owner_heard_just_before_our_own_last_echo_is_not_dropped_when_the_bus_goes_down():
    bus, w1, w2 = bob_tracked_on_w2()
    w2.announce()
    replicate(bus, w1)   # w2's last state before the broker went, at 0.0
    bus.now = 0.6
    w1.announce()
    replicate(bus, w1)   # our own last echo, at 0.6
    for now in (2.6, 3.05, 3.5, 6.0):   # the broker is down all along
        bus.now = now
        assert w1.expire() == [], f"w2 dropped at {now} for the bus's silence"
    assert set(w1.list("room:1")) == {"bob"}


def test_client_diffs_lost_in_a_bus_outage_are_sent_again_when_it_is_back():
    bus = Bus()
    w1 = bus.tracker(b"w1")
    ann, bob = Proc("room:1"), Proc("room:1")
    ann_ref = w1.track(ann, "ann", {})
    w1.track(bob, "bob", {})
    bus.fire()
    w1.announce()
    replicate(bus, w1)   # the bus confirms ann and bob
    bus.sent.clear()
    bus.now = 5.0        # outage: these diffs are lost
    w1.drop_proc(ann)
    cat_ref = w1.track(Proc("room:1"), "cat", {})
    bus.fire()
    bus.sent.clear()
    w1.announce()
    replicate(bus, w1)   # back
    assert bus.diffs() == []
    bus.fire()   # a heartbeat later (the edges have resubscribed): the resend ...
    bus.fire()   # ... goes out with the next merge window
    [diff] = bus.diffs()
    assert [m["phx_ref"] for m in diff["leaves"]["ann"]["metas"]] == [ann_ref]
    assert [m["phx_ref"] for m in diff["joins"]["cat"]["metas"]] == [cat_ref]
    assert "bob" not in diff["joins"] and "bob" not in diff["leaves"]
    bus.sent.clear()
    bus.now = 6.0        # no outage: nothing is sent again
    w1.announce()
    replicate(bus, w1)
    bus.fire()
    assert bus.diffs() == []


# ---- e2e: phoenix.js Presence ------------------------------------------------------------------

def uid() -> str:
    return uuid.uuid4().hex[:8]


def presence_client(js_client, url: str, name: str, topic: str):
    """A phoenix.js client connected as user ``name`` and joined to ``topic`` (channel "p")
    with a phoenix.js Presence on it."""
    client = js_client(name)
    assert client.connect(url, {"user": name})["status"] == "open"
    assert client.join("p", topic, presence=True)["status"] == "ok"
    return client


def synced(client, chan, pred, timeout=5.0, since=0):
    return client.wait_event(lambda e: e.get("type") == "presence_sync" and e.get("chan") == chan
                             and pred(e["list"]), timeout=timeout, since=since)["list"]


@pytest.mark.timeout(60)
def test_presence_state_join_leave_update_and_two_tabs_agree_across_edges(cluster, js_client):
    topic = f"presence:{uid()}"
    a, b, a2 = js_client("a"), js_client("b"), js_client("a2")
    assert a.connect(cluster.ws_urls[0], {"user": "ann"})["status"] == "open"
    assert b.connect(cluster.ws_urls[1], {"user": "bob"})["status"] == "open"
    assert a.join("pa", topic, {"tab": 1}, presence=True)["status"] == "ok"
    listed = synced(a, "pa", lambda l: "ann" in l)
    assert listed["ann"][0]["tab"] == 1 and len(listed["ann"][0]["phx_ref"]) == 16

    mark = len(a.events)
    assert b.join("pb", topic, {"tab": 1}, presence=True)["status"] == "ok"
    assert set(synced(b, "pb", lambda l: set(l) == {"ann", "bob"})) == {"ann", "bob"}
    synced(a, "pa", lambda l: set(l) == {"ann", "bob"}, since=mark)   # join diff at the other client

    # Two tabs of one user: two metas under one key, everywhere.
    assert a2.connect(cluster.ws_urls[1], {"user": "ann"})["status"] == "open"
    assert a2.join("pa2", topic, {"tab": 2}, presence=True)["status"] == "ok"
    for client, chan in ((a, "pa"), (b, "pb"), (a2, "pa2")):
        synced(client, chan, lambda l: sorted(m["tab"] for m in l.get("ann", ())) == [1, 2])

    # Update: one diff with the key in joins and leaves; the new meta names the old ref.
    mark_b = len(b.events)
    b.send("on", chan="pb", event="presence_diff")
    answer = a.push("pa", "update", {"tab": 1, "status": "busy"})
    assert answer["status"] == "ok"
    diff = b.wait_event({"type": "message", "event": "presence_diff"}, since=mark_b)["payload"]
    assert list(diff["joins"]) == ["ann"] and list(diff["leaves"]) == ["ann"]
    [joined], [left] = diff["joins"]["ann"]["metas"], diff["leaves"]["ann"]["metas"]
    assert joined["phx_ref_prev"] == left["phx_ref"] and joined["phx_ref"] == answer["response"]["ref"]
    synced(b, "pb", lambda l: any(m.get("status") == "busy" for m in l.get("ann", ())), since=mark_b)

    # Leave: the entry ends with its channel.
    assert b.leave("pb")["status"] == "ok"
    synced(a, "pa", lambda l: set(l) == {"ann"})
    assert a2.push("pa2", "list", {})["response"].keys() == {"ann"}
    # Disconnect of a tab: only that meta leaves.
    mark = len(a.events)
    a2.disconnect()
    listed = synced(a, "pa", lambda l: len(l.get("ann", ())) == 1, since=mark)
    assert listed["ann"][0]["status"] == "busy"


@pytest.mark.timeout(90)
def test_kill_9_of_a_worker_drops_its_entries_for_the_others_and_rejoin_resyncs(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    topic = f"presence:{uid()}"
    watcher = presence_client(js_client, cluster.ws_urls[0], "watcher", topic)
    watcher_pid = watcher.push("p", "pid", {})["response"]["pid"]
    # A victim client whose channel lands on the other worker (placement is least-loaded).
    victim = None
    for i in range(8):
        c = presence_client(js_client, cluster.ws_urls[1], f"v{i}", topic)
        if c.push("p", "pid", {})["response"]["pid"] != watcher_pid:
            victim = c
            break
    assert victim is not None, "every join landed on the watcher's worker"
    name = victim.name
    [dead_ref] = [m["phx_ref"] for m in synced(watcher, "p", lambda l: name in l)[name]]
    victim_pid = victim.push("p", "pid", {})["response"]["pid"]
    mark_w, mark_v = len(watcher.events), len(victim.events)
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    # The dead worker's entries leave for the other clients as soon as the broker sees it die
    # (phoenix.js rejoins meanwhile, so the user may be back already, with a new meta) ...
    synced(watcher, "p", lambda l: dead_ref not in [m["phx_ref"] for m in l.get(name, ())],
           timeout=8, since=mark_w)
    assert time.monotonic() - killed_at < 2.0, "a dead worker's entries must leave within ~2 s"
    # ... and after phoenix.js rejoins, a fresh presence_state has the user again.
    victim.wait_event({"type": "joined", "chan": "p"}, timeout=15, since=mark_v)
    synced(victim, "p", lambda l: name in l and "watcher" in l, timeout=8, since=mark_v)
    synced(watcher, "p", lambda l: len(l.get(name, ())) == 1, timeout=8, since=mark_w)


@pytest.mark.timeout(120)
def test_broker_restart_shows_no_spurious_leaves_or_joins_and_state_converges(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    topic = f"presence:{uid()}"
    clients, pids = [], set()
    for i in range(8):   # until the entries live on both workers (placement is least-loaded)
        c = presence_client(js_client, cluster.ws_urls[i % 2], f"u{i}", topic)
        pids.add(c.push("p", "pid", {})["response"]["pid"])
        clients.append(c)
        if len(pids) == 2 and len(clients) >= 4:
            break
    assert len(pids) == 2, "every join landed on one worker"
    names = {c.name for c in clients}
    for c in clients:
        synced(c, "p", lambda l: set(l) == names)
        c.on("p", "presence_diff")
    marks = [len(c.events) for c in clients]

    # Down for longer than the owner timeout: no worker may take the silence for a death.
    # A client that disconnects meanwhile leaves once the broker is back.
    gone = clients.pop()
    cluster.restart_broker(down_s=PRESENCE_OWNER_TIMEOUT + 1.0, while_down=gone.disconnect)
    names.discard(gone.name)
    wait_until(lambda: clients[0].push("p", "ping", {}, timeout_ms=1000)["status"] == "ok",
               timeout=20, interval=0.2)
    time.sleep(PRESENCE_OWNER_TIMEOUT + 2 * PRESENCE_ANNOUNCE_INTERVAL)
    for c, mark in zip(clients, marks):
        diffs = [e["payload"] for e in c.messages("p", "presence_diff", since=mark)]
        changed = [d for d in diffs if set(d["joins"]) | set(d["leaves"]) != {gone.name}]
        assert not changed, f"{c.name} saw presence change across the broker restart: {changed}"
        synced(c, "p", lambda l: set(l) == names, since=mark)
        assert not c.find({"type": "chan_error"}) and not c.find({"type": "socket_close"})

    # After it: a newcomer and a leaver reach every client, and every list is the server's.
    newcomer = presence_client(js_client, cluster.ws_urls[1], "new", topic)
    leaver, stayers = clients[0], clients[1:] + [newcomer]
    assert leaver.leave("p")["status"] == "ok"
    expected = (names - {leaver.name}) | {"new"}
    for c in stayers:
        synced(c, "p", lambda l: set(l) == expected, timeout=8)
    for c in stayers:
        assert set(c.push("p", "list", {})["response"]) == expected


@pytest.mark.timeout(60)
def test_entries_of_a_dead_edges_connections_leave(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    topic = f"presence:{uid()}"
    watcher = presence_client(js_client, cluster.ws_urls[0], "watcher", topic)
    for i in range(3):
        presence_client(js_client, cluster.ws_urls[1], f"v{i}", topic)
    everyone = {"watcher", "v0", "v1", "v2"}
    synced(watcher, "p", lambda l: set(l) == everyone)
    mark = watcher.mark()
    killed_at = time.monotonic()
    cluster.edge_procs[1].popen.send_signal(signal.SIGKILL)
    synced(watcher, "p", lambda l: set(l) == {"watcher"}, timeout=10, since=mark)
    assert time.monotonic() - killed_at < 5


def test_a_list_first_reads_the_replication_already_waiting():
    bus, w1, w2 = bob_tracked_on_w2()
    w1.catch_up = lambda: replicate(bus, w1)   # the worker drains its SUB socket here
    assert set(w1.list("room:1")) == {"bob"}
