"""Publishing from outside the workers: the Publisher / AsyncPublisher client, POST
/api/broadcast on the edges and `zchannels publish`, all reaching phoenix.js clients on two edges.

One module cluster (broker + 2 edges + 1 worker, tests/apps/e2e_app.py) whose edges take their
API key from ZCHANNELS_API_KEY.  A PUB socket's first messages are dropped until the broker has
told it the subscriptions (slow joiner), so every delivery test first publishes probes until
each client got one, then checks the real message.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import zmq

from tests.conftest import LOG_LEVEL, ROOT, Proc, wait_until
from zchannels import AsyncPublisher, PublishError, Publisher
from zchannels.publisher import encode

API_KEY = "test-key-" + uuid.uuid4().hex


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def keyed(module_cluster_factory):
    return module_cluster_factory(edges=2, workers=1, env={"ZCHANNELS_API_KEY": API_KEY})


def clients_on_both_edges(js_client, cluster, topic: str, events: list[str]):
    out = []
    for i, url in enumerate(cluster.ws_urls):
        c = js_client(f"edge{i}")
        assert c.connect(url, {"user": f"u{i}"})["status"] == "open"
        assert c.join("x", topic, on=["probe", *events])["status"] == "ok"
        out.append(c)
    return out


def probe_until_delivered(publish, clients, timeout: float = 10.0) -> None:
    """Publish "probe" until every client received one: the subscriptions reached the broker
    and the publisher (PUB slow joiner)."""
    n = itertools.count()

    def everyone_got_one() -> bool:
        publish("probe", {"n": next(n)})
        return all(c.find({"type": "message", "event": "probe"}) for c in clients)

    wait_until(everyone_got_one, timeout, interval=0.05, message="no probe reached every client")


def post(url: str, body, key: str | None = API_KEY, raw: bytes | None = None,
         scheme: str = "Bearer") -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/broadcast", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"{scheme} {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def closed_bus() -> tuple[socket.socket, str]:
    """A bus address whose publish-in port (PORT+1) is bound but not listening: refused."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    return holder, f"tcp://127.0.0.1:{port - 1}"


def zchannels(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchannels", *map(str, args)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


# ---- Publisher ---------------------------------------------------------------------------------

def test_publisher_in_a_plain_script_reaches_clients_on_two_edges(keyed, js_client, tmp_path):
    topic = f"echo:{uid()}"
    clients = clients_on_both_edges(js_client, keyed, topic, ["news"])
    script = tmp_path / "publish.py"
    script.write_text(
        "import sys, time\n"
        "from zchannels import Publisher\n"
        "bus, topic = sys.argv[1], sys.argv[2]\n"
        "with Publisher(bus) as pub:\n"
        "    assert pub.wait_connected(10)\n"
        "    deadline = time.monotonic() + 10\n"
        "    while sys.stdin.readline().strip() == 'probe' and time.monotonic() < deadline:\n"
        "        pub.broadcast(topic, 'probe', {})\n"
        "    pub.broadcast(topic, 'news', {'from': 'script'})\n"
        "    pub.broadcast(topic, 'news', b'\\x00bin')\n")
    proc = subprocess.Popen([sys.executable, str(script), keyed.bus, topic], cwd=str(ROOT),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def probe(_event, _payload):
            proc.stdin.write("probe\n")
            proc.stdin.flush()
        probe_until_delivered(probe, clients)
        proc.stdin.write("done\n")
        proc.stdin.close()
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    for c in clients:
        c.wait_event({"type": "message", "event": "news", "payload": {"from": "script"}})
        c.wait_event(lambda e: e.get("event") == "news" and e.get("payload") == {"binary_b64": "AGJpbg=="})


def test_publisher_validates_like_a_worker_broadcast():
    with pytest.raises(ValueError, match="must not contain NUL"):
        encode("room:\x00x", "ev", {})
    with pytest.raises(ValueError, match="event must not contain NUL"):
        encode("room:1", "e\x00v", {})
    with pytest.raises(TypeError, match="non-empty string"):
        encode("", "ev", {})
    with pytest.raises(TypeError, match="event must be a non-empty string"):
        encode("room:1", "", {})
    with pytest.raises(TypeError, match="dict \\(JSON object\\) or bytes, got list"):
        encode("room:1", "ev", [1])
    with pytest.raises(ValueError, match="reserved for zchannels itself"):
        encode("zchannels:status", "edge", {})


def test_publisher_raises_publish_error_when_the_bus_stays_unreachable():
    holder, bus = closed_bus()
    pub = Publisher(bus, unreachable_timeout=0.3)
    try:
        started = time.monotonic()
        assert pub.broadcast("room:1", "ev", {}) is False   # within the grace period: likely lost

        def error():
            try:
                pub.broadcast("room:1", "ev", {})
            except PublishError as exc:
                return exc
            return None

        exc = wait_until(error, 5)
        assert time.monotonic() - started >= 0.3
        assert f"bus {bus} unreachable for more than 0.3 s" in str(exc)
        assert "connection attempts fail" in str(exc)
        assert pub.wait_connected(0.1) is False
    finally:
        pub.close(linger=0)
        holder.close()
    with pytest.raises(PublishError, match="closed"):
        pub.broadcast("room:1", "ev", {})


def test_full_send_queue_raises_publish_error_instead_of_blocking():
    # A publish-in that subscribes to everything and never reads: the queue fills up.
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xsub.linger = 0
    xsub.rcvhwm = 5
    port = xsub.bind_to_random_port("tcp://127.0.0.1")
    xsub.send(b"\x01")
    pub = Publisher(f"tcp://127.0.0.1:{port - 1}", queue_size=5)
    try:
        def connected():
            xsub.poll(0)   # lets the XSUB attach the pipe and send its subscription
            return pub.connected
        wait_until(connected, 5)

        def queue_full():
            xsub.poll(0)
            try:
                for _ in range(1000):
                    pub.broadcast("room:1", "ev", {"pad": "x" * 1000})
            except PublishError as exc:
                return exc
            return None

        exc = wait_until(queue_full, 10)
        assert "send queue full: 5 message(s)" in str(exc)
    finally:
        pub.close(linger=0)
        xsub.close()
        ctx.term()


def test_async_publisher_reaches_clients_on_two_edges(keyed, js_client):
    topic = f"echo:{uid()}"
    clients = clients_on_both_edges(js_client, keyed, topic, ["news"])

    async def main():
        async with AsyncPublisher(keyed.bus) as pub:
            assert await pub.wait_connected(10)
            deadline = time.monotonic() + 10
            while not all(c.find({"type": "message", "event": "probe"}) for c in clients):
                assert time.monotonic() < deadline, "no probe reached every client"
                assert await pub.broadcast(topic, "probe", {}) is True
                await asyncio.sleep(0.05)
            await pub.broadcast(topic, "news", {"from": "asyncio"})

    asyncio.run(main())
    for c in clients:
        c.wait_event({"type": "message", "event": "news", "payload": {"from": "asyncio"}})


def test_async_publisher_raises_publish_error_when_the_bus_stays_unreachable():
    holder, bus = closed_bus()

    async def main():
        async with AsyncPublisher(bus, unreachable_timeout=0.2) as pub:
            assert await pub.wait_connected(0.1) is False
            deadline = time.monotonic() + 5
            while True:
                try:
                    await pub.broadcast("room:1", "ev", {})
                except PublishError as exc:
                    return str(exc)
                assert time.monotonic() < deadline, "no PublishError"
                await asyncio.sleep(0.02)

    try:
        assert f"bus {bus} unreachable for more than 0.2 s" in asyncio.run(main())
    finally:
        holder.close()
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        AsyncPublisher(bus)


# ---- POST /api/broadcast -----------------------------------------------------------------------

def test_http_broadcast_reaches_clients_on_both_edges(keyed, js_client):
    topic = f"echo:{uid()}"
    clients = clients_on_both_edges(js_client, keyed, topic, ["news", "more", "half"])
    probe_until_delivered(
        lambda ev, p: post(keyed.http_urls[0], {"topic": topic, "event": ev, "payload": p}), clients)
    # A batch with one bad item publishes none of it: "half" would arrive before "news".
    half = [{"topic": topic, "event": "half", "payload": {}}, {"topic": topic, "event": "half"}]
    assert post(keyed.http_urls[1], half)[0] == 400
    status, body = post(keyed.http_urls[1], {"topic": topic, "event": "news", "payload": {"n": 1}})
    assert (status, body) == (202, {"accepted": 1})
    batch = [{"topic": topic, "event": "more", "payload": {"i": i}} for i in range(3)]
    assert post(keyed.http_urls[0], batch) == (202, {"accepted": 3})
    for c in clients:
        c.wait_event({"type": "message", "event": "news", "payload": {"n": 1}})
        got = c.wait_events({"type": "message", "event": "more"}, 3)
        assert [m["payload"]["i"] for m in got] == [0, 1, 2]
        assert c.find({"type": "message", "event": "half"}) == []


def test_http_broadcast_without_or_with_a_wrong_key_is_401(keyed):
    url = keyed.http_urls[0]
    item = {"topic": "echo:x", "event": "e", "payload": {}}
    for key, scheme in ((None, "Bearer"), ("wrong", "Bearer"), (API_KEY + "x", "Bearer"),
                        (API_KEY, "Basic"), ("", "Bearer")):
        status, body = post(url, item, key=key, scheme=scheme)
        assert status == 401, (key, scheme)
        assert "Authorization: Bearer KEY" in body["error"]


@pytest.mark.parametrize("raw, error", [
    (b"{not json", "body is not JSON"),
    (b'{"event": "e", "payload": {}}', "missing field(s): topic"),
    (b'{"topic": "echo:1", "event": "e", "payload": [1]}', "payload must be a JSON object, got an array"),
    (b'{"topic": "echo:1", "event": "e", "payload": "s"}', "payload must be a JSON object, got a string"),
    (b'{"topic": "echo:\\u0000x", "event": "e", "payload": {}}', "topic must not contain NUL"),
    (b'{"topic": "echo:1", "event": "e\\u0000", "payload": {}}', "event must not contain NUL"),
    (b'{"topic": "echo:\\u0000", "event": "e", "payload": [1]}', "topic must not contain NUL"),
    (b'{"topic": "", "event": "e", "payload": {}}', "topic must be a non-empty string"),
    (b'{"topic": "echo:1", "event": 5, "payload": {}}', "event must be a non-empty string, got 5"),
    (b'{"topic": "zchannels:status", "event": "edge", "payload": {}}', "are reserved for zchannels"),
    (b"[]", "empty batch"),
    (b"42", "expected an object {topic, event, payload}, got a number"),
    (json.dumps([{"topic": "echo:1", "event": "e", "payload": {}}] * 1001).encode(),
     "batch of 1001 items; at most 1000"),
    (json.dumps([{"topic": "echo:1", "event": "e", "payload": {}}, {"topic": "echo:1"}]).encode(),
     "item 1: missing field(s): event, payload"),
])
def test_http_broadcast_bad_bodies_are_400_with_the_reason(keyed, raw, error):
    status, body = post(keyed.http_urls[0], None, raw=raw)
    assert status == 400
    assert error in body["error"]


def test_http_batch_of_1000_is_accepted(keyed):
    batch = [{"topic": f"echo:{uid()}", "event": "e", "payload": {"i": i}} for i in range(1000)]
    assert post(keyed.http_urls[0], batch) == (202, {"accepted": 1000})


def test_http_broadcast_is_404_unless_a_key_is_configured_and_the_flag_sets_one(keyed):
    plain = Proc("zchannels.edge", "--bus", keyed.bus, "--port", "0", "--log-level", LOG_LEVEL, name="edge-nokey")
    flagged = Proc("zchannels.edge", "--bus", keyed.bus, "--port", "0", "--api-key", "flag-key",
                   "--log-level", LOG_LEVEL, name="edge-flag")
    try:
        plain_url = plain.wait_ready()[0]["http"]
        flagged_url = flagged.wait_ready()[0]["http"]
        item = {"topic": "echo:x", "event": "e", "payload": {}}
        status, body = post(plain_url, item)
        assert status == 404 and "--api-key" in body["error"]
        assert post(flagged_url, item, key="flag-key") == (202, {"accepted": 1})
        assert post(flagged_url, item)[0] == 401
        assert "HTTP publishing on: POST /api/broadcast (API key from --api-key)" in flagged.stderr_text()
        assert "flag-key" not in flagged.stderr_text()
    finally:
        for p in (plain, flagged):
            p.stop()
            p.cleanup()


# ---- zchannels publish -------------------------------------------------------------------------

def test_publish_command_delivers_to_clients_on_both_edges(keyed, js_client):
    topic = f"echo:{uid()}"
    clients = clients_on_both_edges(js_client, keyed, topic, ["news"])
    with Publisher(keyed.bus) as pub:   # the subscriptions reached the broker: probe first
        assert pub.wait_connected(10)
        probe_until_delivered(lambda ev, p: pub.broadcast(topic, ev, p), clients)
    done = zchannels("publish", topic, "news", '{"from": "cli"}', "--bus", keyed.bus)
    assert done.returncode == 0, done.stderr
    assert f"published 'news' to '{topic}'" in done.stdout
    for c in clients:
        c.wait_event({"type": "message", "event": "news", "payload": {"from": "cli"}})


def test_publish_command_exits_1_when_the_bus_is_unreachable():
    holder, bus = closed_bus()
    try:
        done = zchannels("publish", "echo:1", "news", "{}", "--bus", bus, "--timeout", "0.5")
    finally:
        holder.close()
    assert done.returncode == 1
    assert f"zchannels publish: error: bus {bus} unreachable for more than 0.5 s" in done.stderr
    assert "Traceback" not in done.stderr


def test_publish_command_refuses_a_payload_that_is_not_an_object():
    done = zchannels("publish", "echo:1", "news", "[1]")
    assert done.returncode == 2
    assert "JSON must be an object" in done.stderr


# ---- CURVE -------------------------------------------------------------------------------------

def test_publisher_with_curve_keys_delivers_and_without_them_is_refused(cluster_factory, js_client, tmp_path):
    keys = tmp_path / "keys"
    assert zchannels("keys", keys).returncode == 0
    client_flags = ["--curve-server-key", str(keys / "broker.key"),
                    "--curve-secret", str(keys / "client.key_secret")]
    secured = cluster_factory(edges=1, workers=1, edge_args=client_flags, worker_args=client_flags,
                              broker_args=["--curve-secret", str(keys / "broker.key_secret"),
                                           "--curve-clients", str(keys)])
    topic = f"echo:{uid()}"
    c = js_client("a")
    assert c.connect(secured.ws_urls[0], {"user": "a"})["status"] == "open"
    assert c.join("x", topic, on=["probe", "news"])["status"] == "ok"
    with Publisher(secured.bus, curve_server_key=keys / "broker.key",
                   curve_secret=keys / "client.key_secret") as pub:
        assert pub.wait_connected(10)
        probe_until_delivered(lambda ev, p: pub.broadcast(topic, ev, p), [c])
        pub.broadcast(topic, "news", {"secure": True})
    c.wait_event({"type": "message", "event": "news", "payload": {"secure": True}})

    with Publisher(secured.bus, unreachable_timeout=0.3) as intruder:
        assert intruder.wait_connected(0.5) is False
        with pytest.raises(PublishError, match="handshake refused"):
            intruder.broadcast(topic, "news", {"secure": False})
    done = zchannels("publish", topic, "news", "{}", "--bus", secured.bus, "--timeout", "0.5",
                     "--curve-server-key", keys / "broker.key", "--curve-secret", keys / "client.key_secret")
    assert done.returncode == 0, done.stderr
