"""End to end with the real phoenix.js 1.8.17 client (and a raw WebSocket where phoenix.js cannot
show the wire): broker + 2 edges + 2 workers running tests/apps/e2e_app.py.

Each test uses its own topics, so they share one cluster per module. Numbers in the docstrings
refer to docs/protocol.md: §10 (conformance checklist) and §4.3 (S-rows).
"""
from __future__ import annotations

import signal
import time
import urllib.request
import uuid

import pytest

from tests.conftest import wait_until
from tests.jsclient import unb64
from tests.rawws import HandshakeRefused, RawWS

# A wrong rejoin or reconnect shows up fast with these, instead of after phoenix's 1 s / 10 ms.
FAST = {"rejoinAfterMs": 100}


def uid() -> str:
    return uuid.uuid4().hex[:10]


def client(js_client, cluster, name: str = "js", edge: int = 0, params: dict | None = None, **opts):
    c = js_client(name)
    opts.setdefault("frames", True)
    answer = c.connect(cluster.ws_urls[edge], params or {"user": name}, **opts)
    assert answer["status"] == "open", answer
    return c


def reply_frames(frames: list, topic: str, ref: str | None = None) -> list:
    return [f for f in frames if isinstance(f, list) and f[2] == topic and f[3] == "phx_reply"
            and (ref is None or f[1] == ref)]


# ---- joining -----------------------------------------------------------------------------------

def test_join_ok_replies_with_the_join_response_and_matching_refs(js_client, cluster):
    """§10.8: reply [J,J,T,"phx_reply",{"status":"ok","response":…}]."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    answer = c.join("a", topic)
    assert answer["status"] == "ok"
    assert answer["response"] == {"joined": topic}
    join_ref = answer["join_ref"]
    sent = [f for f in c.wire("out") if f[2] == topic and f[3] == "phx_join"]
    assert sent == [[join_ref, join_ref, topic, "phx_join", {}]]
    assert reply_frames(c.wire("in"), topic) == [
        [join_ref, join_ref, topic, "phx_reply", {"status": "ok", "response": {"joined": topic}}]]


def test_join_error_reaches_receive_error(js_client, cluster):
    """§10.9: join/3 returning an error."""
    c = client(js_client, cluster)
    answer = c.join("a", f"private:{uid()}")
    assert (answer["status"], answer["response"]) == ("error", {"reason": "unauthorized"})
    c.leave("a")


def test_join_that_raises_replies_join_crashed(js_client, cluster):
    """§10.11 / S5."""
    c = client(js_client, cluster)
    answer = c.join("a", f"crashjoin:{uid()}")
    assert (answer["status"], answer["response"]) == ("error", {"reason": "join crashed"})
    c.leave("a")


def test_join_of_unmatched_topic_replies_error_with_null_join_ref(js_client, cluster):
    """§10.10 / S7."""
    topic = f"nosuch:{uid()}"
    c = client(js_client, cluster)
    answer = c.join("a", topic)
    assert (answer["status"], answer["response"]) == ("error", {"reason": "unmatched topic"})
    replies = reply_frames(c.wire("in"), topic)
    assert replies and replies[0][0] is None
    assert replies[0][4] == {"status": "error", "response": {"reason": "unmatched topic"}}
    c.leave("a")


def test_join_error_is_retried_by_the_client(js_client, cluster):
    """§10.9: after a join error phoenix.js retries with rejoinAfterMs; each retry gets a reply."""
    c = client(js_client, cluster, **FAST)
    c.join("a", f"private:{uid()}")
    errors = c.wait_events({"type": "join_error", "chan": "a"}, 3, timeout=5)
    assert all(e["response"] == {"reason": "unauthorized"} for e in errors)
    c.leave("a")


# ---- pushes and replies ------------------------------------------------------------------------

def test_push_replies_ok_error_and_custom_status(js_client, cluster):
    """§10.16."""
    c = client(js_client, cluster)
    assert c.join("a", f"echo:{uid()}")["status"] == "ok"
    assert c.push("a", "ping", {"q": 1, "nested": {"l": [1, "x", None]}}) == \
        {"status": "ok", "response": {"q": 1, "nested": {"l": [1, "x", None]}}}
    assert c.push("a", "error", {"q": 1}) == {"status": "error", "response": {}}
    assert c.push("a", "custom", {"c": "y"}) == {"status": "custom", "response": {"c": "y"}}


def test_reply_carries_the_push_ref_and_the_join_ref(js_client, cluster):
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    join_ref = c.join("a", topic)["join_ref"]
    c.push("a", "ping", {"k": 2})
    sent = [f for f in c.wire("out") if f[2] == topic and f[3] == "ping"]
    assert len(sent) == 1 and sent[0][0] == join_ref
    ref = sent[0][1]
    assert reply_frames(c.wire("in"), topic, ref) == \
        [[join_ref, ref, topic, "phx_reply", {"status": "ok", "response": {"k": 2}}]]


def test_noreply_push_times_out_on_the_client(js_client, cluster):
    """§10.17: noreply → receive("timeout") and nothing else on the wire."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    c.join("a", topic)
    started = time.monotonic()
    assert c.push("a", "noreply", {}, timeout_ms=300)["status"] == "timeout"
    assert time.monotonic() - started >= 0.29
    # Still alive, and the only replies on the wire are the join's and this ping's.
    assert c.push("a", "ping", {"after": True})["status"] == "ok"
    assert [f[4]["response"] for f in reply_frames(c.wire("in"), topic)] == [{"joined": topic}, {"after": True}]


def test_server_push_reaches_channel_on_with_join_ref_and_null_ref(js_client, cluster):
    """§10.19 / S17: [J, null, T, E, P]."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    join_ref = c.join("a", topic, on=["pushed"])["join_ref"]
    c.push("a", "push", {"x": 1}, nowait=True)
    msg = c.wait_event({"type": "message", "chan": "a", "event": "pushed"})
    assert msg["payload"] == {"x": 1}
    assert msg["join_ref"] == join_ref and msg["ref"] is None
    assert [join_ref, None, topic, "pushed", {"x": 1}] in c.wire("in")


def test_push_from_handle_info_after_join(js_client, cluster):
    c = client(js_client, cluster)
    join_ref = c.join("a", f"echo:{uid()}", on=["push_after"])["join_ref"]
    c.push("a", "push_after", {"n": 7}, nowait=True)
    msg = c.wait_event({"type": "message", "chan": "a", "event": "push_after"}, timeout=3)
    assert msg["payload"] == {"n": 7} and msg["join_ref"] == join_ref


def test_push_made_before_the_join_completes_is_sent_after_join_ok(js_client, cluster):
    """§10.18: phoenix.js buffers it, then sends it with a fresh ref after the join reply."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    c.join("a", topic, nowait=True)
    assert c.push("a", "ping", {"early": 1}) == {"status": "ok", "response": {"early": 1}}
    out = [f for f in c.wire("out") if f[2] == topic]
    assert [f[3] for f in out] == ["phx_join", "ping"]
    replies = reply_frames(c.wire("in"), topic)
    assert [r[1] for r in replies] == [out[0][1], out[1][1]]   # join reply first


def test_worker_pid_is_one_of_the_cluster_workers(js_client, cluster):
    c = client(js_client, cluster)
    c.join("a", f"echo:{uid()}")
    pid = c.push("a", "pid")["response"]["pid"]
    assert pid in cluster.worker_pids


# ---- broadcasts --------------------------------------------------------------------------------

def test_broadcast_reaches_clients_on_two_edges_and_broadcast_from_skips_the_sender(js_client, cluster):
    """§10.21: A and C on edge 0, B on edge 1."""
    assert cluster.http_urls[0] != cluster.http_urls[1]
    topic = f"echo:{uid()}"
    a = client(js_client, cluster, "a", edge=0)
    b = client(js_client, cluster, "b", edge=1)
    c = client(js_client, cluster, "c", edge=0)
    for cl in (a, b, c):
        assert cl.join("x", topic, on=["bcast"])["status"] == "ok"

    assert a.push("x", "bcast", {"m": 1}) == {"status": "ok", "response": {}}
    for cl in (a, b, c):
        msg = cl.wait_event({"type": "message", "event": "bcast", "payload": {"m": 1}})
        assert msg["ref"] is None
        # phoenix.js hands callbacks the channel's join ref when the frame has none: check the wire.
        assert [None, None, topic, "bcast", {"m": 1}] in cl.wire("in")

    mark = a.mark()
    assert a.push("x", "bcast_from", {"m": 2}) == {"status": "ok", "response": {}}
    for cl in (b, c):
        cl.wait_event({"type": "message", "event": "bcast", "payload": {"m": 2}})
    # Absence can only be checked over a window: the others got it already, give A a moment more.
    time.sleep(0.3)
    assert a.find({"type": "message", "event": "bcast", "payload": {"m": 2}}, since=mark) == []


def test_broadcast_is_delivered_once_per_client(js_client, cluster):
    topic = f"echo:{uid()}"
    a = client(js_client, cluster, "a", edge=0)
    b = client(js_client, cluster, "b", edge=1)
    for cl in (a, b):
        cl.join("x", topic, on=["bcast"])
    for i in range(20):
        a.push("x", "bcast", {"i": i}, nowait=True)
    for cl in (a, b):
        msgs = cl.wait_events({"type": "message", "event": "bcast"}, 20, timeout=5)
        assert [m["payload"]["i"] for m in msgs] == list(range(20))   # ordered, no duplicates
    time.sleep(0.2)
    assert len(a.messages("x", "bcast")) == 20 and len(b.messages("x", "bcast")) == 20


def test_broadcast_does_not_leak_to_prefix_topics(js_client, cluster):
    """Topic keys are exact: a broadcast on T does not reach T + "0"."""
    base = f"echo:{uid()}"
    a = client(js_client, cluster, "a", edge=0)
    b = client(js_client, cluster, "b", edge=1)
    a.join("x", base, on=["bcast"])
    b.join("x", base + "0", on=["bcast"])
    b.join("y", base, on=["bcast"])
    a.push("x", "bcast", {"p": 1})
    b.wait_event({"type": "message", "chan": "y", "event": "bcast"})
    time.sleep(0.2)
    assert b.messages("x", "bcast") == []


def test_intercepted_broadcast_goes_through_handle_out_per_client(js_client, cluster):
    """§10.22: seen_by differs per client; drop:true is suppressed."""
    topic = f"intercept:{uid()}"
    ann = client(js_client, cluster, "ann", edge=0, params={"user": "ann"})
    bob = client(js_client, cluster, "bob", edge=1, params={"user": "bob"})
    refs = {}
    for cl in (ann, bob):
        refs[cl.name] = cl.join("x", topic, on=["filtered"])["join_ref"]

    assert ann.push("x", "filtered", {"v": 1})["status"] == "ok"
    for cl in (ann, bob):
        msg = cl.wait_event({"type": "message", "event": "filtered"})
        assert msg["payload"] == {"v": 1, "seen_by": cl.name}
        # pushed by handle_out (S17, channel join ref), not fastlaned (S18, null join ref)
        assert [refs[cl.name], None, topic, "filtered", {"v": 1, "seen_by": cl.name}] in cl.wire("in")

    ann.push("x", "filtered", {"v": 2, "drop": True})
    bob.push("x", "filtered", {"v": 3})
    for cl in (ann, bob):
        cl.wait_event({"type": "message", "event": "filtered", "payload": {"v": 3, "seen_by": cl.name}})
        # handle_out runs in order per channel: v3 arrived, so v2 was already handled (dropped).
        assert [m["payload"]["v"] for m in cl.messages("x", "filtered")] == [1, 3]


# ---- binary ------------------------------------------------------------------------------------

def test_binary_push_gets_binary_reply(js_client, cluster):
    """§10.24: ArrayBuffer push → binary handle_in → binary reply as ArrayBuffer."""
    c = client(js_client, cluster)
    c.join("a", f"echo:{uid()}")
    data = bytes(range(256)) * 4
    answer = c.push("a", "binary", binary=data)
    assert answer["status"] == "ok"
    assert unb64(answer["response"]) == data[::-1]
    assert any(isinstance(f, bytes) and f[0] == 1 for f in c.wire("in"))   # kind 1 reply frame


def test_binary_server_push_and_broadcast(js_client, cluster):
    """§10.24: binary push (kind 0, join ref) and binary broadcast (kind 2, no join ref)."""
    topic = f"echo:{uid()}"
    a = client(js_client, cluster, "a", edge=0)
    b = client(js_client, cluster, "b", edge=1)
    ref_a = a.join("x", topic, on=["pushed", "bcast"])["join_ref"]
    b.join("x", topic, on=["bcast"])

    a.push("x", "push", binary=b"\x00\x01bin", nowait=True)
    msg = a.wait_event({"type": "message", "event": "pushed"})
    assert unb64(msg["payload"]) == b"\x00\x01bin"
    push_frame = bytes([0, len(ref_a), len(topic), len("pushed")]) + ref_a.encode() + topic.encode() + \
        b"pushed\x00\x01bin"
    assert push_frame in a.wire("in")

    assert a.push("x", "bcast", binary=b"\xffcast")["status"] == "ok"
    for cl in (a, b):
        msg = cl.wait_event({"type": "message", "event": "bcast"})
        assert unb64(msg["payload"]) == b"\xffcast"
        assert bytes([2, len(topic), len("bcast")]) + topic.encode() + b"bcast\xffcast" in cl.wire("in")


def test_json_push_to_binary_event_gets_error_reply(js_client, cluster):
    c = client(js_client, cluster)
    c.join("a", f"echo:{uid()}")
    assert c.push("a", "binary", {"not": "binary"}) == \
        {"status": "error", "response": {"reason": "expected a binary payload"}}


# ---- crashes, stops, leaving --------------------------------------------------------------------

@pytest.mark.parametrize("event", ["raise", "stop_crash", "bad_return"])
def test_channel_crash_sends_phx_error_and_client_rejoins(js_client, cluster, event):
    """§10.28 / S15: phx_error {"reason":"channel_crash"}, onError, automatic rejoin with a new ref."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster, **FAST)
    first_ref = c.join("a", topic)["join_ref"]
    c.push("a", event, {}, nowait=True)
    err = c.wait_event({"type": "chan_error", "chan": "a"})
    assert err["reason"] == {"reason": "channel_crash"}
    assert [first_ref, first_ref, topic, "phx_error", {"reason": "channel_crash"}] in c.wire("in")
    joins = c.wait_events({"type": "joined", "chan": "a"}, 2, timeout=5)
    assert joins[1]["join_ref"] != first_ref
    assert c.push("a", "ping", {"again": 1}) == {"status": "ok", "response": {"again": 1}}


def test_pushes_waiting_on_a_crashed_channel_get_an_error_reply_not_a_timeout(js_client, cluster):
    """Beyond Phoenix (where they time out after 10 s): the crashing push and the one queued
    behind it are answered {"reason": "channel lost"} before the phx_error."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster, **FAST)
    c.join("a", topic)
    started = time.monotonic()
    results = c.push_many("a", [("raise", {}), ("ping", {"behind": 1})], timeout_ms=8000)
    assert results[0] == {"status": "error", "response": {"reason": "channel lost"}}
    # The second is "channel lost" too when it reached the worker before the crash was known,
    # else the edge has already dropped the channel and answers "unmatched topic".
    assert results[1]["status"] == "error" and results[1]["response"]["reason"] in (
        "channel lost", "unmatched topic")
    assert time.monotonic() - started < 4
    c.wait_event({"type": "chan_error", "chan": "a"})
    assert c.push("a", "ping", {"again": 1}) == {"status": "ok", "response": {"again": 1}}


def test_stop_normal_closes_the_channel_without_rejoin(js_client, cluster):
    """§10.27 / S16."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster, **FAST)
    join_ref = c.join("a", topic)["join_ref"]
    c.push("a", "stop_normal", {}, nowait=True)
    c.wait_event({"type": "chan_close", "chan": "a"})
    assert [join_ref, join_ref, topic, "phx_close", {}] in c.wire("in")
    time.sleep(0.5)   # a (wrong) rejoin would be sent 100 ms after an error
    assert len(c.find({"type": "joined", "chan": "a"})) == 1
    assert c.find({"type": "chan_error", "chan": "a"}) == []
    assert [f for f in c.wire("out") if f[2] == topic and f[3] == "phx_join"] == \
        [[join_ref, join_ref, topic, "phx_join", {}]]


def test_stop_with_reply_sends_the_reply_before_phx_close(js_client, cluster):
    """§10.29 / §5.10, item 4."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster, **FAST)
    join_ref = c.join("a", topic)["join_ref"]
    assert c.push("a", "stop_reply", {}) == {"status": "ok", "response": {"bye": True}}
    c.wait_event({"type": "chan_close", "chan": "a"})
    frames = [f for f in c.wire("in") if f[2] == topic]
    events = [f[3] for f in frames]
    assert events[-2:] == ["phx_reply", "phx_close"], frames
    assert frames[-1] == [join_ref, join_ref, topic, "phx_close", {}]


def test_leave_replies_closes_and_runs_terminate(js_client, cluster):
    """§10.26 / S9: reply ok then phx_close; terminate runs with (shutdown, left)."""
    topic = f"terminate:{uid()}"
    watcher = client(js_client, cluster, "watcher", edge=1)
    watcher.join("w", "terminations:" + topic, on=["terminated"])
    c = client(js_client, cluster, "a", edge=0)
    join_ref = c.join("a", topic)["join_ref"]
    assert c.leave("a")["status"] == "ok"
    c.wait_event({"type": "chan_close", "chan": "a"})
    leave = [f for f in c.wire("out") if f[2] == topic and f[3] == "phx_leave"]
    assert len(leave) == 1 and leave[0][0] == join_ref
    wait_until(lambda: [f for f in c.wire("in") if f[2] == topic and f[3] == "phx_close"], 3,
               message=lambda: str(c.wire("in")))
    frames = [f for f in c.wire("in") if f[2] == topic][1:]   # after the join reply
    assert frames == [[join_ref, leave[0][1], topic, "phx_reply", {"status": "ok", "response": {}}],
                      [join_ref, join_ref, topic, "phx_close", {}]]
    msg = watcher.wait_event({"type": "message", "event": "terminated"})
    assert "left" in msg["payload"]["reason"] and "shutdown" in msg["payload"]["reason"]


def test_closing_the_socket_runs_terminate_with_closed(js_client, cluster):
    """§10.30: terminate (shutdown, closed) when the client goes away."""
    topic = f"terminate:{uid()}"
    watcher = client(js_client, cluster, "watcher", edge=1)
    watcher.join("w", "terminations:" + topic, on=["terminated"])
    c = client(js_client, cluster, "a", edge=0)
    c.join("a", topic)
    c.disconnect()
    msg = watcher.wait_event({"type": "message", "event": "terminated"})
    assert "closed" in msg["payload"]["reason"]


def test_second_channel_object_on_same_topic_replaces_the_first(js_client, cluster):
    """§10.14: wire shows phx_leave (old J) then phx_join (new J); first onClose; second joins."""
    topic = f"echo:{uid()}"
    c = client(js_client, cluster)
    ref1 = c.join("one", topic)["join_ref"]
    answer = c.join("two", topic)
    assert answer["status"] == "ok" and answer["response"] == {"joined": topic}
    ref2 = answer["join_ref"]
    c.wait_event({"type": "chan_close", "chan": "one"})
    out = [f for f in c.wire("out") if f[2] == topic]
    assert [(f[0], f[3]) for f in out] == [(ref1, "phx_join"), (ref1, "phx_leave"), (ref2, "phx_join")]
    assert c.push("two", "ping", {"z": 1}) == {"status": "ok", "response": {"z": 1}}


# ---- socket-level ------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{"reject": True}, {"crash": True}])
def test_refused_connect_errors_and_closes_1006_without_open(js_client, cluster, params):
    """§10.2: a refused upgrade looks like error + close(1006) to phoenix.js."""
    c = js_client("refused")
    answer = c.connect(cluster.ws_urls[0], params, reconnectAfterMs=60_000)
    assert answer["status"] in ("error", "closed"), answer
    close = c.wait_event({"type": "socket_close"})
    assert close["code"] == 1006
    c.wait_event({"type": "socket_error"})
    assert c.find({"type": "socket_open"}) == []


@pytest.mark.parametrize("params", [{"reject": True}, {"crash": True}, {}])
def test_refused_upgrade_is_http_403(cluster, params):
    """§2.6: refusal (and an unsupported vsn) answers the upgrade with 403."""
    url = cluster.raw_url(0, vsn="2.0.0", **{k: "1" for k in params}) if params else \
        cluster.raw_url(0, vsn="3.0.0")
    with pytest.raises(HandshakeRefused) as info:
        RawWS.connect(url)
    assert info.value.code == 403


def test_a_flood_of_refused_upgrades_is_counted_and_logged_once_a_second(cluster):
    """Bad input costs a line a second, not a line a request: 40 refused connects in a burst."""
    for _ in range(40):
        with pytest.raises(HandshakeRefused):
            RawWS.connect(cluster.raw_url(0, vsn="2.0.0", reject="1"))
    scrape = urllib.request.urlopen(cluster.http_urls[0] + "/metrics", timeout=5).read().decode()
    count = next(float(line.split()[-1]) for line in scrape.splitlines()
                 if line.startswith("zchannels_edge_connect_refusals_total"))
    assert count >= 40
    lines = [line for line in cluster.edge_procs[0].stderr_text().splitlines()
             if "refused" in line and "rejected" in line]
    assert 1 <= len(lines) <= 10, lines


def test_socket_ping_heartbeat_round_trip(js_client, cluster):
    """§10.6 through phoenix.js (socket.ping sends a heartbeat)."""
    c = client(js_client, cluster)
    assert c.ping()["status"] == "ok"
    hb = [f for f in c.wire("out") if f[2] == "phoenix"]
    assert hb and hb[-1][0] is None and hb[-1][3] == "heartbeat"
    assert [None, hb[-1][1], "phoenix", "phx_reply", {"status": "ok", "response": {}}] in c.wire("in")


def test_heartbeats_keep_a_fast_heartbeating_client_connected(js_client, cluster):
    """§10.6: with heartbeatIntervalMs 100 the client never times out over ~1.5 s."""
    c = client(js_client, cluster, heartbeatIntervalMs=100)
    wait_until(lambda: len([f for f in c.wire("in") if f[2] == "phoenix"]) >= 8, 5)
    assert c.find({"type": "socket_close"}) == []


@pytest.mark.timeout(60)
def test_idle_connection_is_closed_but_heartbeating_client_is_not(cluster_factory, js_client):
    """§10.5 with --heartbeat-timeout 1: silence closes the socket; phoenix.js heartbeats keep it."""
    small = cluster_factory(edges=1, workers=1, edge_args=["--heartbeat-timeout", "1"])
    live = js_client("live")
    assert live.connect(small.ws_urls[0], {"user": "live"}, heartbeatIntervalMs=200)["status"] == "open"
    idle = RawWS.connect(small.raw_url(0))
    started = time.monotonic()
    assert idle.wait_closed(5), "an idle connection was not closed"
    assert 0.9 <= time.monotonic() - started < 5
    time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
    assert live.find({"type": "socket_close"}) == []
    assert live.ping()["status"] == "ok"


@pytest.mark.timeout(60)
def test_sigterm_closes_clients_with_1012_and_every_process_exits_0(cluster_factory, js_client):
    """§10.32: a stopping edge closes its sockets with 1012 (clients reconnect); exit codes 0."""
    small = cluster_factory(edges=1, workers=1)
    c = js_client("c")
    assert c.connect(small.ws_urls[0], {"user": "c"}, reconnectAfterMs=60_000)["status"] == "open"
    assert c.join("a", f"echo:{uid()}")["status"] == "ok"
    codes = small.stop()
    assert codes == {"workers": 0, "edge0": 0, "broker": 0}, small.stderr()
    close = c.wait_event({"type": "socket_close"})
    assert close["code"] == 1012


@pytest.mark.timeout(60)
def test_a_push_in_flight_when_the_edge_drains_gets_an_error_reply_before_the_1012(cluster_factory):
    """A push still waiting for its handler when the edge closes the connection (SIGTERM, bus
    loss, a "disconnect" broadcast) is answered {"reason":"connection closing"}: the client
    hears of it now instead of after its own push timeout."""
    small = cluster_factory(edges=1, workers=1)
    topic = f"slow:{uid()}"
    with RawWS.connect(small.raw_url(0)) as ws:
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_json()[4]["status"] == "ok"
        ws.send_json(["1", "2", topic, "sleep", {"s": 5}])
        ws.send_json([None, "3", "phoenix", "heartbeat", {}])
        assert ws.recv_json()[1] == "3"             # the sleep is with the worker by now
        small.edge_procs[0].popen.send_signal(signal.SIGTERM)
        assert ws.recv_json(timeout=10) == ["1", "2", topic, "phx_reply",
                                            {"status": "error", "response": {"reason": "connection closing"}}]
        assert ws.recv(timeout=10) is None and ws.close_code == 1012


def test_connect_params_reach_connect_assigns(js_client, cluster):
    """§10.1: params (nested) reach connect/3; assigns are visible to channels."""
    c = client(js_client, cluster, params={"user": "zed", "a": {"b": 1}})
    c.join("a", f"echo:{uid()}")
    assert c.push("a", "assigns")["response"]["assigns"]["user"] == "zed"


# ---- raw wire checks ---------------------------------------------------------------------------

def test_heartbeat_reply_is_exact(cluster):
    """§10.6 / S1."""
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json([None, "1", "phoenix", "heartbeat", {}])
        assert ws.recv_json(3) == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


@pytest.mark.parametrize("vsn", ["1.0.0", None])
def test_v1_serializer_speaks_objects_without_join_ref(cluster, vsn):
    """§3.3: vsn=1.0.0 or no vsn → V1 JSON objects; the server never sends join_ref."""
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(1, vsn=vsn)) as ws:
        ws.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"})
        assert ws.recv_json(3) == {"topic": topic, "event": "phx_reply", "ref": "1",
                                   "payload": {"status": "ok", "response": {"joined": topic}}}
        ws.send_json({"topic": topic, "event": "ping", "payload": {"v": 1}, "ref": "2"})
        assert ws.recv_json(3) == {"topic": topic, "event": "phx_reply", "ref": "2",
                                   "payload": {"status": "ok", "response": {"v": 1}}}
        ws.send_json({"topic": topic, "event": "push", "payload": {"p": 1}, "ref": "3", "join_ref": "1"})
        assert ws.recv_json(3) == {"topic": topic, "event": "pushed", "ref": None, "payload": {"p": 1}}
        ws.send_json({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "4"})
        assert ws.recv_json(3) == {"topic": "phoenix", "event": "phx_reply", "ref": "4",
                                   "payload": {"status": "ok", "response": {}}}


def test_v1_and_v2_clients_share_a_broadcast(cluster):
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0, vsn="1.0.0")) as v1, RawWS.connect(cluster.raw_url(1)) as v2:
        v1.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "1"})
        assert v1.recv_json(3)["payload"]["status"] == "ok"
        v2.send_json(["1", "1", topic, "phx_join", {}])
        assert v2.recv_json(3)[4]["status"] == "ok"
        v2.send_json(["1", "2", topic, "bcast", {"both": 1}])
        assert v1.recv_until(lambda m: m.get("event") == "bcast", 3) == \
            {"topic": topic, "event": "bcast", "payload": {"both": 1}, "ref": None}
        assert v2.recv_until(lambda m: m[3] == "bcast", 3) == [None, None, topic, "bcast", {"both": 1}]


def test_unmatched_topic_join_reply_is_exact(cluster):
    """S7."""
    topic = f"nosuch:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["3", "3", topic, "phx_join", {}])
        assert ws.recv_json(3) == [None, "3", topic, "phx_reply",
                                   {"status": "error", "response": {"reason": "unmatched topic"}}]


def test_server_side_duplicate_join_replies_then_closes_the_old_instance(cluster):
    """§10.15 / S8: new join reply first, then [J1,J1,T,"phx_close",{}]."""
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_json(3)[4]["status"] == "ok"
        ws.send_json(["2", "2", topic, "phx_join", {}])
        assert ws.recv_json(3) == ["2", "2", topic, "phx_reply", {"status": "ok", "response": {"joined": topic}}]
        assert ws.recv_json(3) == ["1", "1", topic, "phx_close", {}]
        ws.send_json(["2", "3", topic, "ping", {"new": 1}])
        assert ws.recv_json(3) == ["2", "3", topic, "phx_reply", {"status": "ok", "response": {"new": 1}}]


def test_stale_join_ref_is_dropped_silently(cluster):
    """§10.23 / S13."""
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_json(3)[4]["status"] == "ok"
        ws.send_json(["999", "2", topic, "ping", {"stale": 1}])
        ws.send_json(["1", "3", topic, "ping", {"fresh": 1}])
        ws.send_json([None, "4", topic, "ping", {"null_ref": 1}])
        assert ws.recv_json(3) == ["1", "3", topic, "phx_reply", {"status": "ok", "response": {"fresh": 1}}]
        assert ws.recv_json(3) == ["1", "4", topic, "phx_reply", {"status": "ok", "response": {"null_ref": 1}}]


def test_leave_of_a_topic_not_joined_replies_ok(cluster):
    """S11."""
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["5", "6", topic, "phx_leave", {}])
        assert ws.recv_json(3) == ["5", "6", topic, "phx_reply", {"status": "ok", "response": {}}]
