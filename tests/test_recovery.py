"""Message recovery end to end (docs/recovery.md): positions on broadcasts of history topics,
whoever publishes them, and a rejoin with zc_since that gets exactly what it missed, then the
live broadcasts, over WebSocket (V2 and V1 JSON) and LongPoll; the explicit not_recovered."""
from __future__ import annotations

import itertools
import json
import urllib.request
import uuid

import pytest

from tests.conftest import ROOT, Cluster, wait_until
from tests.rawws import RawWS
from zchannels import Publisher

pytestmark = pytest.mark.timeout(90)

APP = str(ROOT / "tests" / "apps" / "history_app.py")
API_KEY = "test-key-" + uuid.uuid4().hex
refs = itertools.count(100)


@pytest.fixture(scope="module")
def hcluster():
    c = Cluster(app=APP, edges=1, workers=1, broker_args=("--history", "ops:*=50/60", "--history", "small:*=3/60"),
                env={"ZCHANNELS_API_KEY": API_KEY})
    yield c
    c.stop()
    c.cleanup()


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Client:
    """A raw V2 (or V1) JSON client: join, push, and the broadcasts it got, in order."""

    def __init__(self, cluster, vsn="2.0.0"):
        self.v1 = vsn.startswith("1")
        self.ws = RawWS.connect(cluster.raw_url(0, vsn=vsn))
        self.got: list[tuple] = []     # (topic, event, payload, ref) of every non-reply message
        self.join_refs: dict[str, str] = {}

    def send(self, topic, event, payload, join_ref=None):
        ref = str(next(refs))
        if event == "phx_join":
            join_ref = self.join_refs[topic] = ref
        if self.v1:
            self.ws.send_json({"topic": topic, "event": event, "payload": payload, "ref": ref})
        else:
            self.ws.send_json([join_ref, ref, topic, event, payload])
        return ref

    def _norm(self, m):
        if self.v1:
            return m.get("join_ref"), m["ref"], m["topic"], m["event"], m["payload"]
        return tuple(m)

    def reply(self, ref, timeout=10.0):
        while True:
            m = self._norm(self.ws.recv_json(timeout))
            if m[3] == "phx_reply" and m[1] == ref:
                return m[4]
            self.got.append((m[2], m[3], m[4], m[1]))

    def join(self, topic, params=None):
        ref = self.send(topic, "phx_join", params or {})
        answer = self.reply(ref)
        assert answer["status"] == "ok", answer
        return ref

    def push(self, topic, event, payload):
        return self.reply(self.send(topic, event, payload, join_ref=self.join_refs[topic]))

    def until(self, pred, timeout=10.0):
        """Messages until pred(message) is true (kept in self.got); that message."""
        for m in self.got:
            if pred(m):
                return m
        while True:
            m = self._norm(self.ws.recv_json(timeout))
            item = (m[2], m[3], m[4], m[1])
            self.got.append(item)
            if pred(item):
                return item

    def close(self):
        self.ws.close()


def msgs(client, topic):
    return [(p["n"], ref) for t, e, p, ref in client.got if t == topic and e == "msg"]


def epoch_of(client, topic: str) -> str:
    """The epoch named by the channel's zc_recovery event."""
    return recovery_event(client, topic)["position"].split(":")[0]


def recovery_event(client, topic):
    return client.until(lambda m: m[0] == topic and m[1] == "zc_recovery")[2]


def publish_from_worker(client, topic, n):
    for i in n:
        assert client.push(topic, "bcast", {"n": i})["status"] == "ok"


def test_broadcasts_on_a_history_topic_carry_increasing_positions_in_the_ref_slot(hcluster):
    topic = f"hist:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic)
        first = recovery_event(c, topic)
        assert first["status"] == "new" and first["replayed"] == 0
        epoch, head = first["position"].split(":")
        assert head == "0"
        publish_from_worker(c, topic, range(1, 4))
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 3)
        assert msgs(c, topic) == [(i, f"{epoch}:{i}") for i in range(1, 4)]
    finally:
        c.close()


def test_positions_come_from_one_sequencer_whoever_publishes(hcluster):
    topic = f"ops:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic)
        epoch = epoch_of(c, topic)
        publish_from_worker(c, topic, [1])
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 1)
        with Publisher(hcluster.bus) as pub:
            assert pub.wait_connected(5)
            pub.broadcast(topic, "msg", {"n": 2})
            c.until(lambda m: m[1] == "msg" and m[2]["n"] == 2)
        body = json.dumps([{"topic": topic, "event": "msg", "payload": {"n": 3}}]).encode()
        req = urllib.request.Request(hcluster.http_urls[0] + "/api/broadcast", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 3)
        assert msgs(c, topic) == [(1, f"{epoch}:1"), (2, f"{epoch}:2"), (3, f"{epoch}:3")]
    finally:
        c.close()


def test_a_topic_without_history_is_unchanged_ref_null_and_no_recovery_event(hcluster):
    topic = f"plain:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic)
        publish_from_worker(c, topic, [1])
        c.until(lambda m: m[1] == "msg")
        assert msgs(c, topic) == [(1, None)]
        assert not [m for m in c.got if m[1] == "zc_recovery"]
    finally:
        c.close()


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
def test_a_rejoin_with_zc_since_gets_exactly_the_missed_broadcasts_in_order_then_live_ones(hcluster, vsn):
    topic, other = f"hist:{uid()}", f"hist:{uid()}"
    publisher, watcher = Client(hcluster), Client(hcluster, vsn)
    try:
        publisher.join(topic)
        watcher.join(topic)
        epoch = epoch_of(watcher, topic)
        publish_from_worker(publisher, topic, range(1, 4))
        watcher.until(lambda m: m[1] == "msg" and m[2]["n"] == 3)
        watcher.close()                                  # offline ...
        publish_from_worker(publisher, topic, range(4, 9))   # ... while these are sent
        back = Client(hcluster, vsn)
        back.join(other)                                 # another history topic on the same socket
        back.join(topic, {"zc_since": f"{epoch}:3"})
        status = recovery_event(back, topic)
        assert status == {"status": "recovered", "position": f"{epoch}:8", "replayed": 5}
        publish_from_worker(publisher, topic, range(9, 11))
        back.until(lambda m: m[1] == "msg" and m[2]["n"] == 10)
        assert msgs(back, topic) == [(i, f"{epoch}:{i}") for i in range(4, 11)]
        assert msgs(back, other) == []
        back.close()
    finally:
        publisher.close()


def test_broadcasts_published_while_rejoining_are_merged_without_gap_or_duplicate(hcluster):
    topic = f"hist:{uid()}"
    publisher = Client(hcluster)
    with Publisher(hcluster.bus) as pub:
        assert pub.wait_connected(5)
        try:
            publisher.join(topic)
            epoch = epoch_of(publisher, topic)
            for i in range(1, 21):
                pub.broadcast(topic, "msg", {"n": i})
            publisher.until(lambda m: m[1] == "msg" and m[2]["n"] == 20)
            back = Client(hcluster)
            ref = back.send(topic, "phx_join", {"zc_since": f"{epoch}:5"})
            for i in range(21, 71):                      # while the join and the read are under way (keep: 100)
                pub.broadcast(topic, "msg", {"n": i})
            assert back.reply(ref)["status"] == "ok"
            try:
                back.until(lambda m: m[1] == "msg" and m[2]["n"] == 70, timeout=15)
            except TimeoutError:
                pytest.fail(f"got {back.got}")
            assert msgs(back, topic) == [(i, f"{epoch}:{i}") for i in range(6, 71)]
            assert recovery_event(back, topic)["status"] == "recovered"
            back.close()
        finally:
            publisher.close()


@pytest.mark.parametrize("since, reason", [
    ("not-a-position", "malformed position"),
    ("{epoch}:999", "future position"),
    ("zzzzzzzz:1", "epoch changed"),
    (17, "malformed position"),
])
def test_a_position_that_cannot_be_recovered_is_told_so_with_its_reason(hcluster, since, reason):
    topic = f"hist:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic)
        epoch = epoch_of(c, topic)
        publish_from_worker(c, topic, [1, 2])
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 2)
        back = Client(hcluster)
        back.join(topic, {"zc_since": since.format(epoch=epoch) if isinstance(since, str) else since})
        status = recovery_event(back, topic)
        assert status == {"status": "not_recovered", "reason": reason, "position": f"{epoch}:2",
                          "replayed": 0}
        publish_from_worker(c, topic, [3])
        back.until(lambda m: m[1] == "msg" and m[2]["n"] == 3)
        assert msgs(back, topic) == [(3, f"{epoch}:3")]     # live from there on, nothing replayed
        back.close()
    finally:
        c.close()


def test_a_position_older_than_the_window_is_too_old(hcluster):
    topic = f"small:{uid()}"       # keeps 3
    c = Client(hcluster)
    try:
        c.join(topic)
        epoch = epoch_of(c, topic)
        publish_from_worker(c, topic, range(1, 8))
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 7)
        back = Client(hcluster)
        back.join(topic, {"zc_since": f"{epoch}:2"})
        assert recovery_event(back, topic) == {"status": "not_recovered", "reason": "position too old",
                                              "position": f"{epoch}:7", "replayed": 0}
        back.close()
        ok = Client(hcluster)
        ok.join(topic, {"zc_since": f"{epoch}:4"})       # 5, 6, 7 are still kept
        assert recovery_event(ok, topic)["status"] == "recovered"
        publish_from_worker(c, topic, [8])
        ok.until(lambda m: m[1] == "msg" and m[2]["n"] == 8)
        assert [n for n, _ in msgs(ok, topic)] == [5, 6, 7, 8]
        ok.close()
    finally:
        c.close()


def test_zc_since_on_a_topic_without_history_is_not_recovered(hcluster):
    topic = f"plain:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic, {"zc_since": "abcdefgh:3"})
        assert recovery_event(c, topic) == {"status": "not_recovered", "reason": "topic keeps no history",
                                           "position": None, "replayed": 0}
    finally:
        c.close()


def test_a_handler_reads_the_last_n_broadcasts_of_its_topic(hcluster):
    topic = f"hist:{uid()}"
    c = Client(hcluster)
    try:
        c.join(topic)
        epoch = epoch_of(c, topic)
        publish_from_worker(c, topic, range(1, 6))
        c.until(lambda m: m[1] == "msg" and m[2]["n"] == 5)
        answer = c.push(topic, "history", {"limit": 3})
        assert answer == {"status": "ok", "response": {"entries": [
            ["msg", {"n": i}, f"{epoch}:{i}"] for i in (3, 4, 5)]}}
        plain = f"plain:{uid()}"
        c.join(plain)
        assert c.push(plain, "history", {"limit": 3}) == {"status": "ok", "response": {"entries": []}}
    finally:
        c.close()


def test_after_a_broker_restart_the_memory_store_has_a_new_epoch(hcluster_restartable):
    c = hcluster_restartable
    topic = f"hist:{uid()}"
    a = Client(c)
    try:
        a.join(topic)
        epoch = epoch_of(a, topic)
        publish_from_worker(a, topic, [1])
        a.until(lambda m: m[1] == "msg" and m[2]["n"] == 1)
    finally:
        a.close()
    c.restart_broker()

    def rejoined():
        b = Client(c)
        try:
            b.join(topic, {"zc_since": f"{epoch}:1"})
            return recovery_event(b, topic)
        finally:
            b.close()
    status = {}
    # until the new broker has the app's rules again (its worker tells it at its first heartbeat)
    wait_until(lambda: status.update(rejoined()) or status.get("reason") not in (
        "history unavailable", "topic keeps no history"), 30)
    assert status["status"] == "not_recovered" and status["reason"] == "epoch changed"
    assert not status["position"].startswith(epoch + ":")


@pytest.fixture
def hcluster_restartable():
    c = Cluster(app=APP, edges=1, workers=1)
    yield c
    c.stop()
    c.cleanup()
