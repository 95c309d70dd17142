"""One peer of the bus: what an edge and a worker both do to be on it.

Edges (edge/bus.py) and workers (workers/runner.py) each hold three sockets to the broker: a
DEALER to its ROUTER (point-to-point frames both ways), a PUB into its publish-in side (the
broadcasts they make) and a SUB on its subscribe-out side (the topics something local wants).
``BusPeer`` owns those sockets and the liveness around them:

* heartbeats out: ``wire.heartbeat(role, load)`` every PEER_HEARTBEAT_INTERVAL, from the
  process's own event loop, so a stuck loop goes silent and the broker notices;
* heartbeats in: the broker probes every peer with its instance id; a new id means the broker
  restarted, and what was in flight through the old one may be lost;
* silence: after BROKER_SILENCE_LIMIT without a frame from the broker the bus is down (one
  warning, ``on_bus_state(False)``); the next frame means it is back (``on_bus_state(True)``,
  also after a restart however short: messages may have been lost either way);
* subscriptions counted per topic key, so many local subscribers cost one ZeroMQ subscription,
  dropped when the last one leaves;
* a BYE when the peer leaves, so the broker counts it gone rather than dead;
* its inbox: the SUB also subscribes to ``wire.inbox_key(peer_id)``, and ``send`` publishes a
  message whose destination is known (``wire.VIA_INBOX``) to that peer's inbox through the
  broker's C proxy; placement requests and the rest go through the DEALER and the broker's
  ROUTER.  The proxy keeps the order of one sender's messages to one receiver, as the ROUTER
  did, and a worker's replies and broadcasts now leave in the order it made them.  The
  publishing socket is an XPUB, so the subscriptions the proxy passes on tell which inboxes
  have a subscriber: a message for a peer whose inbox has none (it is gone, or still
  reconnecting after a broker restart) goes through the ROUTER instead, which holds it over the
  broker's warm-up or hands it back UNROUTABLE, as for any peer it does not know.

What the frames mean stays with the owner: every point-to-point frame (from the broker or from
an inbox) but the broker's heartbeats goes to ``on_direct``, every broadcast to
``on_broadcast``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, NamedTuple

import zmq

from zchannels.bus import curve, history, inbox, loopsock, wire
from zchannels.bus.loopsock import LoopSocket, tune_link
from zchannels.bus.timing import BROKER_SILENCE_LIMIT, PEER_HEARTBEAT_INTERVAL, SAME_OUTAGE_WINDOW

log = logging.getLogger(__name__)



class PeerSockets(NamedTuple):
    dealer: zmq.Socket      # to the broker's ROUTER
    pub: zmq.Socket         # into its publish-in (XSUB); an XPUB, which hears subscriptions
    sub: zmq.Socket         # from its subscribe-out (XPUB)


def connect_peer(ctx: zmq.Context, bus: str, routing_id: bytes, hwm: int,
                 pub_nodrop: bool = False) -> PeerSockets:
    """An edge's or worker's three bus sockets, connected, with the process's CURVE keys if it
    has any and the bus message limit (``loopsock.set_max_message``).  ``pub_nodrop`` makes a
    full PUB queue a failed, counted send instead of a silent drop.  ValueError for a malformed
    ``bus``; zmq.ZMQError when libzmq refuses the address."""
    router_ep, publish_ep, subscribe_ep = wire.bus_endpoints(bus)
    # An XPUB where a PUB would do: it also tells us which inboxes have a subscriber.
    sockets = PeerSockets(ctx.socket(zmq.DEALER), ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB))
    sockets.dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    for sock in sockets:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, loopsock.max_message())
        tune_link(sock)
        curve.secure_client(sock)
    if pub_nodrop:
        sockets.pub.setsockopt(zmq.XPUB_NODROP, 1)
    sockets.sub.setsockopt(zmq.SUBSCRIBE, wire.inbox_key(routing_id))
    sockets.dealer.connect(router_ep)
    sockets.pub.connect(publish_ep)
    sockets.sub.connect(subscribe_ep)
    return sockets


def _nothing(*_args: object) -> None:
    pass


class BusPeer:
    """An edge or a worker on the bus: its sockets, heartbeats both ways, broker silence,
    subscription counts and BYE.  Create it on the running event loop; it heartbeats from then
    on until ``bye`` or ``close``."""

    def __init__(self, sockets: PeerSockets, role: bytes, *,
                 on_direct: Callable[[list[bytes]], None],
                 on_broadcast: Callable[[list[bytes]], None],
                 load: Callable[[], int],
                 on_bus_state: Callable[[bool], None] = _nothing,
                 on_registered: Callable[[], None] = _nothing,
                 on_beat: Callable[[], None] = _nothing,
                 on_bad_frame: Callable[[list[bytes], Exception], None] | None = None,
                 on_undelivered: Callable[[list[bytes]], None] | None = None,
                 name: str = "bus", down_note: str = "still trying",
                 logger: logging.Logger = log,
                 heartbeat_interval: float = PEER_HEARTBEAT_INTERVAL,
                 silence_limit: float = BROKER_SILENCE_LIMIT,
                 loop: asyncio.AbstractEventLoop | None = None):
        """``role``: wire.ROLE_EDGE or wire.ROLE_WORKER, sent in heartbeats and BYE.
        ``load()``: the count sent in each heartbeat (connections, channels).
        ``on_bus_state(False)``: ``silence_limit`` seconds without a word from the broker;
        ``on_bus_state(True)``: it is heard again after such a silence, or a new broker instance
        names itself (a restart, however short): messages in flight then may have been lost.
        ``on_registered()``: the broker's first heartbeat arrived (it knows this peer).
        ``on_beat()``: after each heartbeat sent, from the same loop turn.
        ``on_bad_frame(frames, error)``: a malformed broker heartbeat or inbox message (dropped;
        logged if None).
        ``on_undelivered(frames)``: a message for an inbox that could not be sent (a full queue,
        over the bus limit), so the sender can answer for it (logged and counted if None).
        ``name`` starts this peer's log lines and names its sockets; ``down_note`` says in the
        silence warning what the silence means for this process."""
        self.role = role
        self.name = name
        self.loop = loop or asyncio.get_running_loop()
        self.heartbeat_interval = heartbeat_interval
        self.silence_limit = silence_limit
        self._on_direct = on_direct
        self._on_bus_state = on_bus_state
        self._on_registered = on_registered
        self._on_beat = on_beat
        self._on_bad_frame = on_bad_frame or self._log_bad_frame
        self._load = load
        self._down_note = down_note
        self.log = logger
        self.peer_id: bytes = sockets.dealer.getsockopt(zmq.ROUTING_ID)
        self._on_broadcast = on_broadcast
        self.dealer = LoopSocket(sockets.dealer, self._from_broker, self.loop, name=f"{name} dealer")
        self.sub = LoopSocket(sockets.sub, self._from_sub, self.loop, name=f"{name} sub",
                              decode=bytes)
        self.inboxes: set[bytes] = set()     # peers whose inbox someone subscribes to
        self.pub = LoopSocket(sockets.pub, self._subscription, self.loop, name=f"{name} pub",
                              decode=bytes)
        self.outbox = inbox.Outbox(self.peer_id, self.pub.send_packed, self.loop,
                                   on_undelivered or self._log_undelivered)
        self._send_routed = self.dealer.send
        self._send_inbox = self.outbox.send
        self._via_inbox = wire.VIA_INBOX
        self.undelivered = 0
        self._sub_counts: dict[bytes, int] = {}
        self._now = self.loop.time
        self._last_heard = self._now()
        self._broker_silent = False
        self._back_at = float("-inf")
        self.broker_instance = b""      # named in the broker's heartbeats; new after a restart
        # The history rule table the broker announces in its heartbeats (unknown until the
        # first one: then every broadcast goes through the sequencer), merged with the rules of
        # this process's own app, which it tells every broker instance it meets.
        self.history = history.RuleTable()
        self.app_rules: tuple[history.Rule, ...] = ()
        self._rules_seen = b""
        self._rules_told: bytes | None = None     # the broker instance told app_rules
        self._registered = False
        self._said_bye = False
        self.bad_frames = 0
        self._beat_failures = 0
        self._heartbeat_task: asyncio.Task | None = self.loop.create_task(self._heartbeats())

    # --- the broker's side --------------------------------------------------------------

    @property
    def broker_silent(self) -> bool:
        """True while the bus is down: ``silence_limit`` s or more without a word from the broker."""
        return self._broker_silent

    def silent_for(self) -> float:
        """Seconds since the broker was last heard from."""
        return self._now() - self._last_heard

    def _from_broker(self, frames: list[bytes]) -> None:
        now = self._now()
        silence, self._last_heard = now - self._last_heard, now
        # Also after a silence the heartbeat loop has not flagged yet: the connection may have
        # been remade, and messages lost, all the same.
        back = self._broker_silent or silence > self.silence_limit
        if frames[0] == wire.HEARTBEAT:
            self._broker_heartbeat(frames, now, back)
            return
        if back:
            self._back(now)
        self._on_direct(frames)

    def _broker_heartbeat(self, frames: list[bytes], now: float, back: bool) -> None:
        try:
            beat = wire.parse(frames)
            instance = beat.instance
        except wire.BusFrameError as exc:
            self._on_bad_frame(frames, exc)
            instance = None
        else:
            self._history_rules(instance, beat.rules)
        if instance and self._new_instance(instance, now):
            back = True
        if back:
            self._back(now)
        if instance is not None and not self._registered:
            self._registered = True
            self._on_registered()

    def _history_rules(self, instance: bytes, packed: bytes) -> None:
        if packed != self._rules_seen:
            try:
                announced = history.unpack_rules(packed)
            except ValueError as exc:
                self._on_bad_frame([wire.HEARTBEAT, instance, packed[:60]], exc)
                return
            self._rules_seen = packed
            self.history.update(history.merge(announced, self.app_rules))
        if self.app_rules and self._rules_told != instance:
            self._tell_rules(instance)

    def _tell_rules(self, instance: bytes) -> None:
        self._rules_told = instance
        self.dealer.send(wire.app_history(history.pack_rules(self.app_rules)))

    def _new_instance(self, instance: bytes, now: float) -> bool:
        """Whether this heartbeat names a broker other than the one we knew: it restarted, and
        what was in flight through the old one may be lost, even if the gap was too short to
        count as a silence."""
        if instance == self.broker_instance:
            return False
        known, self.broker_instance = self.broker_instance, instance
        if not known:
            return False
        self.log.info("%s: new broker instance %s (was %s)", self.name,
                      instance.decode(errors="replace"), known.decode(errors="replace"))
        return now - self._back_at > SAME_OUTAGE_WINDOW

    def _back(self, now: float) -> None:
        if self._broker_silent:
            self._broker_silent = False
            self.log.info("%s: broker reachable again", self.name)
        self._back_at = now
        self._on_bus_state(True)

    def _log_bad_frame(self, frames: list[bytes], exc: Exception) -> None:
        self.bad_frames += 1
        if self.bad_frames <= 20 or self.bad_frames % 1000 == 0:
            self.log.warning("%s: dropped a bad frame from the broker (%d so far): %s",
                             self.name, self.bad_frames, exc)

    def _from_sub(self, data: bytes) -> None:
        try:
            if not wire.is_inbox(data):
                self._on_broadcast(wire.unpack_broadcast(data))
                return
            messages = wire.unpack_inbox(data)
        except wire.BusFrameError as exc:
            self._on_bad_frame([data[:40]], exc)
            return
        on_direct = self._on_direct
        for frames in messages:
            on_direct(frames)

    def _subscription(self, data: bytes) -> None:
        """A (un)subscription the broker's proxy passed on to our XPUB: ``1|0`` + key.  Only
        inbox keys matter here."""
        if data[1:3] == wire.INBOX_PREFIX and data[-1:] == wire.TOPIC_TERMINATOR:
            if data[:1] == b"\x01":
                self.inboxes.add(data[3:-1])
            else:
                self.inboxes.discard(data[3:-1])

    def _log_undelivered(self, frames: list[bytes]) -> None:
        self.undelivered += 1
        if self.undelivered <= 20 or self.undelivered % 1000 == 0:
            self.log.warning("%s: a %r for %r was not sent (queue full or over the bus limit); "
                             "%d so far", self.name, frames[0], frames[1][:40], self.undelivered)

    # --- our side -----------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> bool:
        """A point-to-point message ``[kind, dest, *fields]``: to ``dest``'s inbox through the
        proxy when ``dest`` is known and the kind travels that way, else through the broker's
        ROUTER.  False if it was not sent (a full queue, over the bus limit: counted)."""
        if frames[1] in self.inboxes and frames[0] in self._via_inbox:
            return self._send_inbox(frames)
        return self._send_routed(frames)

    async def _heartbeats(self) -> None:
        while True:
            self._beat()
            await asyncio.sleep(self.heartbeat_interval)

    def _beat(self) -> None:
        try:
            if self.app_rules and self._rules_told is None:
                # Before the first heartbeat: the broker knows the app's rules by the time
                # it registers this peer, so before the peer's first channel.
                self._tell_rules(self.broker_instance)
            self.dealer.send(wire.heartbeat(self.role, str(self._load()).encode()))
            self._on_beat()
        except Exception:   # the heartbeats must go on, or the broker declares us dead
            self._beat_failures += 1
            if self._beat_failures == 1 or self._beat_failures % 1000 == 0:
                self.log.exception("%s: heartbeat failed (%d so far)", self.name, self._beat_failures)
        self._check_silence()

    def _check_silence(self) -> None:
        if not self._broker_silent and self.silent_for() > self.silence_limit:
            self._broker_silent = True
            self.log.warning("%s: no word from the broker for %.0fs: %s%s", self.name,
                             self.silent_for(), self._down_note, curve.silent_broker_hint())
            self._on_bus_state(False)

    def publish(self, topic: str, event: str, payload: bytes, fmt: bytes = wire.JSON,
                origin: bytes = b"") -> bool:
        """Broadcast ``payload`` on ``topic`` to every subscriber; False if it was not sent
        (a full queue, over the bus message limit: counted on ``self.pub``).  What this peer
        sent to inboxes before leaves first: a worker's pushes and broadcasts keep their order."""
        return self._publish(topic, wire.broadcast_frames(topic, event, payload, fmt, origin))

    def send_broadcast(self, frames: list[bytes]) -> bool:
        """``publish`` for a broadcast already built (``wire.broadcast_frames``)."""
        return self._publish(wire.topic_from_key(frames[0]), frames)

    def _publish(self, topic: str, frames: list[bytes]) -> bool:
        if self.outbox.waiting:
            self.outbox.flush()
        if self.history.needs_sequencer(topic):
            frames = wire.to_sequencer(frames)
        return self.pub.send(frames)

    def subscribe(self, key: bytes) -> None:
        """One more local subscriber of the topic key ``key`` (``wire.topic_key``)."""
        n = self._sub_counts.get(key, 0)
        if n == 0:
            self.sub.set_option(zmq.SUBSCRIBE, key)
        self._sub_counts[key] = n + 1

    def unsubscribe(self, key: bytes) -> None:
        """One local subscriber of ``key`` fewer; the last one ends the subscription."""
        n = self._sub_counts.get(key, 0)
        if n <= 1:
            self._sub_counts.pop(key, None)
            if n == 1:
                self.sub.set_option(zmq.UNSUBSCRIBE, key)
        else:
            self._sub_counts[key] = n - 1

    def subscribers(self, key: bytes) -> int:
        """How many local subscribers ``key`` has."""
        return self._sub_counts.get(key, 0)

    def bye(self) -> None:
        """Stop heartbeating and tell the broker this peer leaves (once; later calls do nothing).
        The sockets stay open for the last replies and broadcasts."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        if not self._said_bye:
            self._said_bye = True
            self.dealer.send(wire.bye(self.role))

    def close(self, linger_ms: int = 0) -> None:
        """``bye``, then close the three sockets; what is queued may leave for ``linger_ms``."""
        self.bye()
        self.outbox.flush()
        for sock in (self.dealer, self.sub, self.pub):
            sock.close(linger_ms)
