"""Message recovery end to end with the unmodified phoenix.js and /js/zchannels-recovery.js: a
client cut off while broadcasts are sent gets every one of them exactly once and in order when
it reconnects, over WebSocket and LongPoll, with the memory and the Redis store; across a
broker restart it is recovered with Redis and told "not_recovered" with memory.

The cut is a paused socket: the client reaches its edge through tests/tcpproxy.py, which
freezes (nothing forwarded, the TCP connection open); phoenix.js notices by its heartbeat and
gives the connection up, while the edge goes on writing the broadcasts into it; then that
connection is reset with what it held (so none of them reaches the client by it), and the
client reconnects through the proxy as soon as it is unfrozen. Broadcasts come from
zchannels.Publisher, so they are sequenced by the broker like any publisher's."""
from __future__ import annotations

import signal
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from tests.conftest import Cluster, Proc
from tests.jsclient import JsClient
from tests.redisserver import REDIS_SERVER, RedisServer, redis_server_fixture
from tests.tcpproxy import TcpProxy
from zchannels import Publisher

pytestmark = pytest.mark.timeout(90)

redis_server = pytest.fixture(scope="module")(redis_server_fixture)
RULE = "echo:*=1000/300"
# phoenix.js notices a paused socket by its heartbeat over WebSocket (one every 300 ms here, 30 s
# by default), by a poll unanswered for longpollerTimeout over LongPoll (the edge answers empty
# polls after 0.5 s here, --longpoll-window).
CLIENT_OPTS = {"heartbeatIntervalMs": 300, "longpollerTimeout": 1500,
               "reconnectAfterMs": [50, 100, 200], "rejoinAfterMs": [50, 100, 200]}


def store_arg(store: str, request) -> str:
    if store == "memory":
        return "memory"
    server = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(params=["memory", "redis"])
def store(request):
    return request.param, store_arg(request.param, request)


def start_cluster(store_url: str) -> Cluster:
    return Cluster(edges=1, workers=1, broker_args=["--history", RULE, "--history-store", store_url],
                   edge_args=["--longpoll-window", "0.5"])


def restart_broker(cluster: Cluster, store_url: str) -> None:
    """Kill the broker and start a new one on the same bus with the same history flags."""
    cluster.broker.popen.send_signal(signal.SIGKILL)
    cluster.broker.popen.wait(5)
    cluster.broker = cluster._add(Proc("zchannels.broker", "--bus", cluster.bus, "--history", RULE,
                                       "--history-store", store_url, name="broker2"))
    assert cluster.broker.wait_ready(1, 10)[0]["bus"] == cluster.bus


class Sent:
    """Broadcasts numbered 1, 2, 3 ... on one topic, through a Publisher on the bus."""

    def __init__(self, cluster: Cluster, topic: str):
        self.publisher = Publisher(cluster.bus)
        assert self.publisher.wait_connected(10)
        self.topic = topic
        self.n = 0

    def send(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            assert self.publisher.broadcast(self.topic, "new_msg", {"n": self.n})


def proxied_client(cluster: Cluster, transport: str) -> tuple[JsClient, TcpProxy]:
    edge = urlsplit(cluster.http_urls[0])
    proxy = TcpProxy([(edge.hostname, edge.port)])
    client = JsClient(f"rec-{transport}")
    scheme = "ws" if transport == "websocket" else "http"
    client.connect(f"{scheme}://127.0.0.1:{proxy.port}/socket", params={"user": "ann"},
                   transport=transport, **CLIENT_OPTS)
    return client, proxy


def tear_down(cluster: Cluster, *things) -> None:
    """Close the clients and proxies a test made (None: never made), then the cluster."""
    for thing in things:
        if thing is not None:
            thing.close()
    cluster.stop()
    cluster.cleanup()


def join(client: JsClient, topic: str) -> None:
    answer = client.send("join", chan="c", topic=topic, params={}, on=["new_msg"], recovery=True)
    assert answer["status"] == "ok", answer


def received(client: JsClient) -> list[int]:
    return [ev["payload"]["n"] for ev in list(client.events)
            if ev.get("type") == "message" and ev.get("event") == "new_msg"]


def wait_received(client: JsClient, upto: int, timeout: float = 15.0) -> None:
    client.wait_event(lambda ev: ev.get("type") == "message" and ev.get("payload", {}).get("n") == upto,
                      timeout=timeout)


def reconnect(proxy: TcpProxy) -> None:
    """The old connection reset with the broadcasts it held; new ones go through."""
    proxy.sever()
    proxy.unfreeze()


def cut(client: JsClient, proxy: TcpProxy) -> int:
    """Freeze the link and wait until phoenix.js gave the connection up (its heartbeat timed
    out, which errors its channels); the event mark."""
    mark = client.mark()
    proxy.freeze()
    client.wait_event({"type": "chan_error", "chan": "c"}, timeout=10, since=mark)
    return client.mark()


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_a_client_cut_off_gets_every_broadcast_sent_meanwhile_once_and_in_order(store, transport):
    kind, url = store
    cluster = start_cluster(url)
    client = proxy = None
    try:
        client, proxy = proxied_client(cluster, transport)
        topic = f"echo:cut-{transport}-{kind}"
        join(client, topic)
        first = client.wait_event({"type": "recovery", "chan": "c"}, timeout=5)
        assert first["info"]["status"] == "new"
        sent = Sent(cluster, topic)
        sent.send(5)
        wait_received(client, 5)
        mark = cut(client, proxy)
        sent.send(40)                        # while the client is away
        reconnect(proxy)
        recovery = client.wait_event({"type": "recovery", "chan": "c"}, timeout=15, since=mark)
        assert recovery["info"]["status"] == "recovered", recovery
        assert recovery["info"]["replayed"] == 40
        sent.send(5)                         # live again
        wait_received(client, 50)
        assert received(client) == list(range(1, 51))
        positions = [ev["ref"] for ev in client.events if ev.get("type") == "message"]
        offsets = [int(p.split(":")[1]) for p in positions]
        assert offsets == list(range(1, 51))           # each broadcast's position in its ref
    finally:
        tear_down(cluster, client, proxy)


def test_after_a_broker_restart_redis_recovers_and_memory_says_not_recovered(store):
    kind, url = store
    cluster = start_cluster(url)
    client = proxy = None
    try:
        client, proxy = proxied_client(cluster, "websocket")
        topic = f"echo:restart-{kind}"
        join(client, topic)
        sent = Sent(cluster, topic)
        sent.send(3)
        wait_received(client, 3)
        mark = cut(client, proxy)
        sent.send(10)                        # stored by the first broker
        sent.publisher.close()
        restart_broker(cluster, url)
        sent = Sent(cluster, topic)
        sent.n = 13
        reconnect(proxy)
        recovery = client.wait_event({"type": "recovery", "chan": "c"}, timeout=20, since=mark)
        if kind == "redis":
            assert recovery["info"]["status"] == "recovered", recovery
            sent.send(2)
            wait_received(client, 15)
            assert received(client) == list(range(1, 16))
        else:
            assert recovery["info"]["status"] == "not_recovered", recovery
            assert recovery["info"]["reason"] == "epoch changed"
            sent.send(2)
            wait_received(client, 15)
            assert received(client) == [1, 2, 3, 14, 15]
    finally:
        tear_down(cluster, client, proxy)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_a_client_whose_edge_is_restarted_gets_the_20s_it_missed_from_the_new_edge(transport):
    """A deploy: the client's edge stops (SIGTERM: its clients are closed 1012), broadcasts go on
    for 20 s while nothing listens at that address, then a new edge process takes the address
    over and the client, reconnecting on its own schedule, is recovered there."""
    cluster = start_cluster("memory")
    client = proxy = None
    try:
        client, proxy = proxied_client(cluster, transport)
        topic = f"echo:deploy-{transport}"
        join(client, topic)
        sent = Sent(cluster, topic)
        sent.send(5)
        wait_received(client, 5)
        mark = client.mark()
        old_edge = cluster.edge_procs[0]
        proxy.targets = [("127.0.0.1", 1)]          # nothing listens there while the edge is away
        old_edge.popen.send_signal(signal.SIGTERM)
        try:
            old_edge.popen.wait(30)
        except Exception:
            raise AssertionError(old_edge.stderr_text()[-3000:])
        client.wait_event({"type": "chan_error", "chan": "c"}, timeout=10, since=mark)
        for _ in range(10):                         # 20 s away, a broadcast every 100 ms
            sent.send(10)
            time.sleep(2.0)
        new_edge = cluster._add(Proc("zchannels.edge", "--bus", cluster.bus, "--port", "0",
                                     "--longpoll-window", "0.5", name="edge-new"))
        url = urlsplit(new_edge.wait_ready()[0]["http"])
        proxy.targets = [(url.hostname, url.port)]
        recovery = client.wait_event({"type": "recovery", "chan": "c"}, timeout=20, since=mark)
        assert recovery["info"]["status"] == "recovered", recovery
        assert recovery["info"]["replayed"] == 100
        sent.send(5)
        wait_received(client, 110)
        assert received(client) == list(range(1, 111))
    finally:
        tear_down(cluster, client, proxy)


def test_every_edge_serves_the_helper_next_to_phoenix_js():
    cluster = Cluster(edges=1, workers=1)
    try:
        with urllib.request.urlopen(cluster.http_urls[0] + "/js/zchannels-recovery.js", timeout=5) as r:
            body = r.read()
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/javascript")
        assert b"zc_since" in body and b"ZchannelsRecovery" in body
    finally:
        cluster.stop()
        cluster.cleanup()


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_the_chat_example_declares_its_history_and_a_tab_away_gets_every_message(transport):
    """No operator flag: the chat's handler module declares `history` for its rooms."""
    cluster = Cluster(app="examples/chat/channels.py", edges=1, workers=2,
                      edge_args=["--longpoll-window", "0.5"])
    away = proxy = sender = None
    try:
        away, proxy = proxied_client(cluster, transport)
        answer = away.send("join", chan="c", topic="room:lobby", params={}, on=["new_msg"], recovery=True)
        assert answer["status"] == "ok"
        sender = JsClient("sender")
        sender.connect(cluster.ws_urls[0], params={"user": "bob"})
        assert sender.join("lobby", "room:lobby", {}, on=["new_msg"])["status"] == "ok"
        bodies = [f"line {i}" for i in range(1, 26)]
        sender.push("lobby", "new_msg", {"body": bodies[0]})
        away.wait_event(lambda ev: ev.get("payload", {}).get("body") == bodies[0], timeout=10)
        mark = cut(away, proxy)
        for body in bodies[1:]:
            assert sender.push("lobby", "new_msg", {"body": body}, nowait=True)["status"] == "sent"
        sender.wait_event(lambda ev: ev.get("payload", {}).get("body") == bodies[-1], timeout=10)
        reconnect(proxy)
        recovery = away.wait_event({"type": "recovery", "chan": "c"}, timeout=15, since=mark)
        assert recovery["info"]["status"] == "recovered" and recovery["info"]["replayed"] == 24
        away.wait_event(lambda ev: ev.get("payload", {}).get("body") == bodies[-1], timeout=10, since=mark)
        shown = [ev["payload"]["body"] for ev in away.events if ev.get("event") == "new_msg"]
        assert shown == bodies
    finally:
        for thing in (away, proxy, sender):
            if thing is not None:
                thing.close()
        cluster.stop()
        cluster.cleanup()


def test_a_redis_outage_is_one_log_line_and_broadcasts_still_arrive_live(tmp_path):
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is missing (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    cluster = start_cluster(server.url)
    client = None
    try:
        client = JsClient("outage")
        client.connect(cluster.ws_urls[0], params={"user": "ann"})
        join(client, "echo:outage")
        sent = Sent(cluster, "echo:outage")
        sent.send(2)
        wait_received(client, 2)
        server.stop()
        sent.send(20)                        # not stored, delivered
        wait_received(client, 22)
        server.start()
        sent.send(1)
        cluster.broker.wait_for(lambda: "reachable again" in cluster.broker.stderr_text(), 10,
                                "the broker to find Redis again")
        sent.send(1)
        wait_received(client, 24)
        assert received(client) == list(range(1, 25))
        log = cluster.broker.stderr_text()
        assert log.count("unreachable") == 1, log
        assert "Traceback" not in log
    finally:
        if client is not None:
            client.close()
        cluster.stop()
        cluster.cleanup()
        server.stop()
