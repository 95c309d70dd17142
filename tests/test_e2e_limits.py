"""Per-connection limits and what a client sees when it hits one (README's limits table):
the inbound message rate (--max-rate / --max-burst) and slow consumers (--max-outbound).
The frame size (1009) and channel count limits are in test_e2e_badinput.py, the heartbeat
timeout in test_e2e_channels.py.

Whatever one connection does, another one on the same edge keeps being served in full.
"""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from tests.blockingws import BlockingWS
from tests.conftest import wait_until
from tests.rawws import RawWS

RATE, BURST = 20, 10
MAX_OUTBOUND = 512 * 1024
RATE_LIMITED = {"status": "error", "response": {"reason": "rate limited"}}


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def rate_cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, edge_args=[
        "--max-rate", str(RATE), "--max-burst", str(BURST), "--longpoll-window", "1"])


@pytest.fixture(scope="module")
def slow_cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, edge_args=["--max-outbound", str(MAX_OUTBOUND)])


class Joined:
    """A raw V2 client joined to its own echo topic."""

    def __init__(self, cluster, name: str, topic: str | None = None):
        self.topic = topic or f"echo:{name}-{uid()}"
        self.ws = RawWS.connect(cluster.raw_url(0, user=name))
        self.ws.send_json(["1", "1", self.topic, "phx_join", {}])
        assert self.ws.recv_json(5)[4]["status"] == "ok"

    def replies(self, refs: list[str], timeout: float = 5.0) -> dict[str, list]:
        """The replies to `refs`, by ref (other frames are skipped)."""
        wanted, got = set(refs), {}
        deadline = time.monotonic() + timeout
        while wanted - got.keys():
            msg = self.ws.recv_until(lambda m: isinstance(m, list) and m[3] == "phx_reply",
                                     deadline - time.monotonic())
            got[msg[1]] = msg
        return got


# ---- inbound rate ------------------------------------------------------------------------------

def test_messages_over_the_rate_get_an_error_reply(rate_cluster):
    """The burst passes (the join took one token), the rest is refused with a Phoenix reply that
    names the message; the connection stays usable and recovers at --max-rate."""
    c = Joined(rate_cluster, "burst")
    refs = [str(i) for i in range(100, 130)]
    for ref in refs:
        c.ws.send_json(["1", ref, c.topic, "ping", {"n": ref}])
    got = c.replies(refs)
    ok = [r for r in refs if got[r][4]["status"] == "ok"]
    refused = [r for r in refs if got[r][4] == RATE_LIMITED]
    assert len(ok) + len(refused) == len(refs)
    assert BURST - 1 <= len(ok) <= BURST + 3, ok
    assert all(got[r][:3] == ["1", r, c.topic] for r in refused)

    # Heartbeats pass however empty the bucket is.
    c.ws.send_json([None, "hb", "phoenix", "heartbeat", {}])
    assert c.replies(["hb"])["hb"][4] == {"status": "ok", "response": {}}
    time.sleep(2 * BURST / RATE)      # the bucket refills: waiting is the behaviour under test
    c.ws.send_json(["1", "200", c.topic, "ping", {"again": 1}])
    assert c.replies(["200"])["200"][4] == {"status": "ok", "response": {"again": 1}}
    assert not c.ws.closed
    c.ws.close()


def test_a_refused_join_gets_its_join_ref_and_phoenix_can_retry(rate_cluster):
    c = Joined(rate_cluster, "joins")
    topic = f"echo:{uid()}"
    refs = [str(i) for i in range(300, 300 + 2 * BURST)]
    for ref in refs:                  # empty the bucket, and join in the same burst
        c.ws.send_json([None, ref, "phoenix", "not_a_heartbeat", {}])
    c.ws.send_json(["9", "9", topic, "phx_join", {}])
    assert c.replies(refs + ["9"])["9"] == ["9", "9", topic, "phx_reply", RATE_LIMITED]
    time.sleep(2 * BURST / RATE)
    c.ws.send_json(["10", "10", topic, "phx_join", {}])
    assert c.replies(["10"])["10"][4] == {"status": "ok", "response": {"joined": topic}}
    c.ws.close()


def test_heartbeats_are_never_rate_limited(rate_cluster):
    c = Joined(rate_cluster, "beats")
    refs = [f"hb{i}" for i in range(10 * BURST)]
    for ref in refs:
        c.ws.send_json([None, ref, "phoenix", "heartbeat", {}])
    got = c.replies(refs)
    assert all(got[r][4] == {"status": "ok", "response": {}} for r in refs)
    assert not c.ws.closed
    c.ws.close()


def test_a_client_that_keeps_sending_over_the_rate_is_closed_with_1008(rate_cluster):
    bystander = Joined(rate_cluster, "bystander")
    flooder = Joined(rate_cluster, "flooder")
    for i in range(400):
        flooder.ws.send_json(["1", str(i), flooder.topic, "ping", {}])
    assert flooder.ws.wait_closed(5), "a client far over the rate was not closed"
    assert (flooder.ws.close_code, flooder.ws.close_reason) == (1008, "rate limit exceeded")
    while flooder.ws.recv(1) is not None:
        pass
    errors = [m for m in flooder.ws.received if isinstance(m, str) and "rate limited" in m]
    assert 100 <= len(errors) <= 101     # ratelimit.MAX_REFUSED answered, then the close
    wait_until(lambda: "closing with 1008" in rate_cluster.edge_procs[0].stderr_text(), 5)
    bystander.ws.send_json(["1", "b1", bystander.topic, "ping", {"still": True}])
    assert bystander.replies(["b1"])["b1"][4] == {"status": "ok", "response": {"still": True}}
    bystander.ws.close()


def test_longpoll_posts_are_rate_limited_per_line(rate_cluster):
    """The limit belongs to the connection, whatever its transport."""
    base = f"{rate_cluster.http_urls[0]}/socket/longpoll?vsn=2.0.0&user=lp"

    def call(url: str, body: bytes | None = None) -> dict:
        req = urllib.request.Request(url, data=body, method="POST" if body else "GET",
                                     headers={"Content-Type": "application/x-ndjson"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    token = call(base)["token"]
    url = f"{rate_cluster.http_urls[0]}/socket/longpoll?vsn=2.0.0&token={token}"
    topic = f"echo:{uid()}"
    lines = [["1", "1", topic, "phx_join", {}]] + [["1", str(i), topic, "ping", {}] for i in range(2, 32)]
    assert call(url, "\n".join(json.dumps(line) for line in lines).encode()) == {"status": 200}
    replies: dict[str, list] = {}
    deadline = time.monotonic() + 10
    while len(replies) < len(lines) and time.monotonic() < deadline:
        for text in call(url).get("messages", []):
            msg = json.loads(text)
            replies[msg[1]] = msg
    assert len(replies) == len(lines)
    refused = [r for r, m in replies.items() if m[4] == RATE_LIMITED]
    assert len(refused) >= len(lines) - BURST - 3
    assert replies["1"][4]["status"] == "ok"     # the join came first and had a token


# ---- slow consumers ----------------------------------------------------------------------------

class HandWS(BlockingWS):
    """A client that can stop reading (the kernel then stops taking the edge's writes) and
    resume later."""

    def __init__(self, http_url: str, name: str):
        super().__init__(http_url, name, rcvbuf=4096)

    def join(self, topic: str) -> None:
        self.send_json(["1", "1", topic, "phx_join", {}])
        opcode, payload = self.recv_frame()
        assert opcode == 1 and json.loads(payload)[4]["status"] == "ok", payload


def log_count(cluster, text: str) -> int:
    return cluster.edge_procs[0].stderr_text().count(text)


@pytest.mark.timeout(90)
def test_slow_consumer_gets_1013_and_one_that_reads_nothing_is_cut_off(slow_cluster):
    """Two clients stop reading while a topic is flooded: past --max-outbound each gets no more
    data but a close frame 1013 behind its backlog.  The one that resumes reading gets its
    backlog in order, then the 1013; the one that never reads is dropped after the grace period.
    A third client on the topic, reading, gets every broadcast."""
    topic = f"echo:flood-{uid()}"
    resumes, stalls = HandWS(slow_cluster.http_urls[0], "resumes"), HandWS(slow_cluster.http_urls[0], "stalls")
    resumes.join(topic)
    stalls.join(topic)
    reader = Joined(slow_cluster, "reader", topic)
    n, size, rounds = 50, 4000, 0
    while log_count(slow_cluster, "closing with 1013") < 2:
        rounds += 1
        assert rounds <= 80, "the stalled clients were never found slow"
        ref = f"f{rounds}"
        reader.ws.send_json(["1", ref, topic, "flood", {"n": n, "size": size}])
        seen = []
        while len(seen) < n:
            msg = reader.ws.recv_until(lambda m: m[3] == "flood" or m[1] == ref, 10)
            if msg[3] == "flood":
                seen.append(msg[4]["i"])
        assert seen == list(range(n)), f"round {rounds}: the reading client lost broadcasts"

    # The one that reads again gets what was queued, in order, then the close frame.
    got, code = [], None
    while code is None:
        opcode, payload = resumes.recv_frame()
        if opcode == 0x8:
            code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
        else:
            msg = json.loads(payload)
            if msg[3] == "flood":
                got.append(msg[4]["i"])
    assert (code, reason) == (1013, "slow consumer")
    assert got and all(b == (a + 1) % n for a, b in zip(got, got[1:])), "backlog out of order or with gaps"
    resumes.send(0x8, code.to_bytes(2, "big"))
    assert resumes.read_until_closed() is None

    # The one that never reads: dropped once the grace period (wsproto.SLOW_CONSUMER_GRACE) is over.
    wait_until(lambda: log_count(slow_cluster, "did not close") >= 1, 15,
               message=lambda: slow_cluster.edge_procs[0].stderr_text()[-3000:])
    assert log_count(slow_cluster, "did not close") == 1, "the client that read its backlog was cut off"
    stalls.sock.settimeout(10)
    assert stalls.read_until_closed() in (None, 1013)

    # The reader never noticed.
    reader.ws.send_json(["1", "last", topic, "flood", {"n": n, "size": size}])
    seen = [reader.ws.recv_until(lambda m: m[3] == "flood", 10)[4]["i"] for _ in range(n)]
    assert seen == list(range(n))
    reader.ws.close()


def test_longpoll_session_that_is_not_polled_ends_past_max_outbound(slow_cluster):
    """A LongPoll client that stops polling while frames pile up: past --max-outbound bytes its
    session ends (the next request gets 410, phoenix.js starts over); the reader loses nothing."""
    topic = f"echo:lpflood-{uid()}"

    def call(url: str, body: bytes | None = None) -> dict:
        req = urllib.request.Request(url, data=body, method="POST" if body else "GET",
                                     headers={"Content-Type": "application/x-ndjson"})
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.loads(resp.read())

    base = f"{slow_cluster.http_urls[0]}/socket/longpoll?vsn=2.0.0"
    url = f"{base}&token={call(base + '&user=lp')['token']}"
    assert call(url, json.dumps(["1", "1", topic, "phx_join", {}]).encode()) == {"status": 200}
    wait_until(lambda: any('"phx_reply"' in m for m in call(url).get("messages", [])), 10)
    reader = Joined(slow_cluster, "lpreader", topic)
    n, size = 50, 4000
    for round_ in range(2 + MAX_OUTBOUND // (n * size)):
        reader.ws.send_json(["1", f"r{round_}", topic, "flood", {"n": n, "size": size}])
        seen = [reader.ws.recv_until(lambda m: m[3] == "flood", 10)[4]["i"] for _ in range(n)]
        assert seen == list(range(n))
    assert call(url) == {"status": 410}
    assert "not polled; ending the session" in slow_cluster.edge_procs[0].stderr_text()
    reader.ws.close()
