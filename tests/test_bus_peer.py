"""BusPeer (bus/peer.py) against a small real broker run in this process: the broker's ROUTER
(broker/router.py, on a thread) and its XSUB/XPUB fan-out (broker/fanout.py) on loopback TCP.

The peer heartbeats with its load, notices a restarted broker by its new instance id, warns
when the broker stays silent past its limit and reports its return, counts subscriptions per
topic key, and says BYE when it closes."""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Callable

import pytest
import zmq

from zchannels.broker.fanout import Fanout
from zchannels.broker.router import Router
from zchannels.broker.server import bind_bus
from zchannels.bus.startup import StartupError
from zchannels.bus import wire
from zchannels.bus.peer import BusPeer, connect_peer

HWM = 1000
FAST_BEAT = 0.05          # seconds between heartbeats in these tests (0.5 in production)


class InProcessBroker:
    """ROUTER + fan-out on free loopback ports; ``stop``/``start`` keep the ports, so a restart
    is what peers see when a broker process is restarted (their connections drop and come back,
    and the new broker names a new instance)."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.bus = "tcp://127.0.0.1:0"
        self.router: Router | None = None
        self.start()

    def start(self) -> None:
        deadline = time.monotonic() + 5
        while True:   # the ports of the broker just stopped may take a moment to be free again
            try:
                self.bus, router_sock, xsub, xpub = bind_bus(self.ctx, self.bus)
                break
            except StartupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.fanout = Fanout(self.ctx, xsub, xpub)
        self.fanout.start()
        self.router = Router(router_sock)
        self.router._warm_until = 0.0   # as if up for a while: nothing parked
        self._stopping = False
        self._thread = threading.Thread(target=self.router.run, args=(lambda: self._stopping,),
                                        name="router", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)
        assert not self._thread.is_alive(), "the router loop did not stop"
        self.fanout.stop()
        self.router.sock.close(linger=0)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def broker(zctx):
    b = InProcessBroker(zctx)
    yield b
    b.stop()


class Recorder:
    """What a BusPeer reports through its callbacks, as awaitable events."""

    def __init__(self):
        self.peer: BusPeer | None = None
        self.registered = asyncio.Event()
        self.states: asyncio.Queue[tuple[bool, float]] = asyncio.Queue()   # (up, silent for)
        self.broadcasts: list[list[bytes]] = []
        self.broadcast_in = asyncio.Event()
        self.beats = 0

    def on_broadcast(self, frames: list[bytes]) -> None:
        self.broadcasts.append(frames)
        self.broadcast_in.set()

    def on_beat(self) -> None:
        self.beats += 1

    def on_bus_state(self, up: bool) -> None:
        self.states.put_nowait((up, self.peer.silent_for()))

    async def next_state(self, timeout: float = 5.0) -> tuple[bool, float]:
        return await asyncio.wait_for(self.states.get(), timeout)

    def events(self) -> list[tuple[str, str]]:
        """(topic, event) of every broadcast received, in order."""
        return [(wire.topic_from_key(f[0]), f[2].decode()) for f in self.broadcasts]


def make_peer(ctx: zmq.Context, bus: str, rec: Recorder, role: bytes = wire.ROLE_WORKER,
              load: Callable[[], int] = lambda: 0, **options) -> tuple[BusPeer, bytes]:
    peer_id = wire.new_peer_id(role, "peer-test")
    peer = BusPeer(connect_peer(ctx, bus, peer_id, HWM), role, on_direct=lambda frames: None,
                   on_broadcast=rec.on_broadcast, load=load, on_bus_state=rec.on_bus_state,
                   on_registered=rec.registered.set, on_beat=rec.on_beat, name="test peer",
                   heartbeat_interval=options.pop("heartbeat_interval", FAST_BEAT), **options)
    rec.peer = peer
    return peer, peer_id


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
def test_heartbeats_register_the_peer_with_the_broker_and_report_its_load(zctx, broker):
    async def scenario():
        rec, load = Recorder(), [7]
        peer, peer_id = make_peer(zctx, broker.bus, rec, load=lambda: load[0])
        try:
            await asyncio.wait_for(rec.registered.wait(), 5)   # the broker's heartbeat came back
            assert peer.broker_instance == broker.router.instance
            workers = broker.router.workers
            await until(lambda: peer_id in workers and workers[peer_id].load == 7)
            load[0] = 3   # every heartbeat carries the load of its moment
            await until(lambda: workers[peer_id].load == 3)
            assert rec.beats >= 2 and rec.states.empty() and not peer.broker_silent
        finally:
            peer.close()
    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_restarted_broker_is_noticed_by_its_new_instance_even_without_a_silence(zctx, broker, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        rec = Recorder()
        peer, peer_id = make_peer(zctx, broker.bus, rec, role=wire.ROLE_EDGE, silence_limit=30.0)
        try:
            await asyncio.wait_for(rec.registered.wait(), 5)
            first = peer.broker_instance
            broker.restart()   # well under the silence limit
            assert (await rec.next_state())[0] is True   # back: what was in flight may be lost
            assert peer.broker_instance == broker.router.instance != first
            assert not peer.broker_silent
            now = broker.router.instance.decode()
            assert f"test peer: new broker instance {now} (was {first.decode()})" in caplog.text
            await until(lambda: peer_id in broker.router.edges)   # heartbeats reach the new broker
            assert rec.states.empty()   # one restart, one report
        finally:
            peer.close()
    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_silent_broker_is_warned_of_after_the_silence_limit_and_its_return_reported(zctx, broker, caplog):
    caplog.set_level(logging.INFO)
    limit = 1.0

    async def scenario():
        rec = Recorder()
        peer, _ = make_peer(zctx, broker.bus, rec, silence_limit=limit, down_note="the bus is down")
        try:
            await asyncio.wait_for(rec.registered.wait(), 5)
            await asyncio.sleep(1.5 * limit)
            assert rec.states.empty() and not peer.broker_silent   # the broker probes: no silence
            broker.stop()
            up, silent_for = await rec.next_state()
            assert up is False and silent_for > limit and peer.broker_silent
            assert re.search(r"test peer: no word from the broker for \d+s: the bus is down", caplog.text)
            broker.start()
            up, silent_for = await rec.next_state()
            assert up is True and silent_for < limit and not peer.broker_silent
            assert "test peer: broker reachable again" in caplog.text
            await asyncio.sleep(3 * FAST_BEAT)
            assert rec.states.empty()   # the new instance named right after the return: same event
        finally:
            peer.close()
    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_subscription_lasts_until_its_last_subscriber_leaves(zctx, broker):
    """Subscriptions reach the publishers in order, so once a later subscription (a control
    topic) delivers, every earlier (un)subscription is in force: then a message on the topic
    published before one on the control topic arrives first, or not at all."""
    topic = "room:counted"
    key = wire.topic_key(topic)

    async def listening(peer: BusPeer, rec: Recorder, control: str) -> None:
        """Subscribe to ``control`` and publish probes on it until one comes back."""
        peer.subscribe(wire.topic_key(control))
        deadline = time.monotonic() + 5
        while (control, "probe") not in rec.events():
            assert time.monotonic() < deadline, f"no broadcast on {control} came back"
            rec.broadcast_in.clear()
            peer.publish(control, "probe", b"{}")
            try:
                await asyncio.wait_for(rec.broadcast_in.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def delivered_before(peer: BusPeer, rec: Recorder, control: str) -> list[list[bytes]]:
        """Publish on the topic, then on ``control``: what of the topic came before the marker."""
        rec.broadcasts.clear()
        assert peer.publish(topic, "msg", b'{"n":1}') and peer.publish(control, "marker", b"{}")
        await until(lambda: (control, "marker") in rec.events())
        before = rec.broadcasts[:rec.events().index((control, "marker"))]
        return [f for f in before if f[2] != b"probe"]

    async def scenario():
        rec = Recorder()
        peer, _ = make_peer(zctx, broker.bus, rec)
        try:
            peer.subscribe(key)
            peer.subscribe(key)
            peer.unsubscribe(key)
            assert peer.subscribers(key) == 1
            await listening(peer, rec, "control:1")
            assert await delivered_before(peer, rec, "control:1") == [
                [key, wire.BROADCAST, b"msg", b"", b'{"n":1}', wire.JSON, b""]]
            peer.unsubscribe(key)   # the last one
            assert peer.subscribers(key) == 0
            await listening(peer, rec, "control:2")
            assert await delivered_before(peer, rec, "control:2") == []
            peer.unsubscribe(key)   # one too many: nothing to end, nothing breaks
            assert peer.subscribers(key) == 0
        finally:
            peer.close()
    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_close_says_bye_so_the_broker_counts_the_peer_gone_not_dead(zctx, broker):
    async def scenario():
        rec = Recorder()
        peer, peer_id = make_peer(zctx, broker.bus, rec)
        await asyncio.wait_for(rec.registered.wait(), 5)
        await until(lambda: peer_id in broker.router.workers)
        peer.close(linger_ms=1000)
        beats = rec.beats
        await until(lambda: peer_id not in broker.router.workers)
        await asyncio.sleep(3 * FAST_BEAT)
        assert rec.beats == beats   # no heartbeat after the BYE
        peer.close()   # twice: nothing more is sent, nothing fails

    asyncio.run(scenario())
    assert broker.router.worker_deaths == 0 and not broker.router.evicted   # "left", not "unreachable"


@pytest.mark.parametrize("frames, error", [
    ([wire.HEARTBEAT], "needs 3 frames, got 1"),
    ([wire.HEARTBEAT, b"abc", b"[]", b"extra"], "needs 3 frames, got 4"),
    ([wire.BYE, b"abc"], "unknown bus kind"),
    ([], "empty bus message"),
])
def test_a_malformed_broker_heartbeat_is_refused_with_its_reason(frames, error):
    assert wire.parse(wire.broker_heartbeat(b"1a2b3c4d")).instance == b"1a2b3c4d"
    with pytest.raises(wire.BusFrameError, match=error):
        wire.parse(frames)
