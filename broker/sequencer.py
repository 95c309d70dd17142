"""The one sequencer: positions for broadcasts on topics that keep history, and history reads.

Publishers send a broadcast on a history topic (and every broadcast while they do not know the
rule table yet) under ``wire.SEQUENCER_PREFIX + topic_key``: libzmq's proxy (broker/fanout.py)
delivers those to this module's SUB alone.  For a topic no rule matches it republishes the
broadcast unchanged; for a history topic it assigns the topic's next offset (from 1, per
epoch), stores the broadcast with its position, then publishes it with ``position`` set.  So
Python runs here once per sequenced broadcast, never per delivery, and broadcasts on other
topics never leave the C proxy thread.

It also answers HISTORY_READ from edges and workers: the router hands each one over an inproc
pipe, and the answers (chunked under the bus message limit) go back the same way for the
router to send (a ROUTER socket belongs to one thread).  Once a second it publishes the rule
table under ``wire.RULES_KEY`` for ``zchannels.Publisher``.

It runs in a thread of its own with an asyncio loop, because stores are asynchronous (Redis).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import zmq
import zmq.asyncio

from zchannels.broker.history.store import Rule, Store, format_position, match
from zchannels.bus import wire

log = logging.getLogger("broker")

BATCH = 1000            # broadcasts sequenced per store write
ANNOUNCE_INTERVAL = 1.0
EXPIRE_INTERVAL = 5.0
PIPE = "inproc://zchannels-history-pipe"
MAX_READ = 1_000_000


class Sequencer:
    """Create it in the broker's main thread (its sockets connect to the proxy's inproc
    endpoints), ``start`` it, set ``rules`` from the router thread whenever the table changes
    (a tuple, replaced as a whole)."""

    def __init__(self, ctx: zmq.Context, store: Store, xsub_inproc: str, xpub_inproc: str,
                 max_message: int):
        self.ctx = ctx
        self.store = store
        self.xsub_inproc, self.xpub_inproc = xsub_inproc, xpub_inproc
        self.chunk_bytes = max(4096, max_message - wire.ENVELOPE_OVERHEAD)
        self.rules: tuple[Rule, ...] = ()
        self.rules_packed = b"[]"
        self.epoch = ""
        self.heads: dict[str, int] = {}         # last offset assigned, per topic
        self.stored: dict[str, int] = {}        # last offset stored, per topic (what reads see)
        self.sequenced = 0
        self.passed = 0
        self.store_failures = 0
        self.reads = 0
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sequencer", daemon=True)
        # The router's end of the pipe: it sends reads in and takes answers out.
        self.pipe = ctx.socket(zmq.PAIR)
        self.pipe.setsockopt(zmq.LINGER, 0)
        self.pipe.bind(PIPE)

    def start(self, timeout: float = 10.0) -> str:
        """Open the store and start sequencing; the epoch.  Raises what opening raised."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the history store did not open within {timeout:g}s")
        if self._failed is not None:
            raise self._failed
        return self.epoch

    def set_rules(self, rules: tuple[Rule, ...], packed: bytes) -> None:
        self.rules, self.rules_packed = rules, packed

    def stop(self, timeout: float = 2.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout)
        self.pipe.close(linger=0)

    # --- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except Exception as exc:   # reported to start() when it happens while opening
            if not self._ready.is_set():
                self._failed = exc
                self._ready.set()
            else:
                log.exception("sequencer stopped")
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.epoch = await self.store.open()
        actx = zmq.asyncio.Context.shadow(self.ctx)
        sub, pub, pipe = actx.socket(zmq.SUB), actx.socket(zmq.PUB), actx.socket(zmq.PAIR)
        for sock in (sub, pub, pipe):
            sock.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        pub.setsockopt(zmq.SNDHWM, 0)
        sub.connect(self.xpub_inproc)
        sub.setsockopt(zmq.SUBSCRIBE, wire.SEQUENCER_PREFIX)
        pub.connect(self.xsub_inproc)
        pipe.connect(PIPE)
        self._ready.set()
        tasks = [asyncio.ensure_future(t) for t in
                 (self._sequence(sub, pub), self._answer(pipe), self._announce(pub))]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sock in (sub, pub, pipe):
                sock.close(linger=0)
            await self.store.close()

    async def _sequence(self, sub, pub) -> None:
        recv = sub.recv
        while True:
            batch = [await recv()]
            while len(batch) < BATCH:
                try:
                    batch.append(recv(zmq.NOBLOCK).result())
                except zmq.Again:
                    break
            for data in await self._sequence_batch(batch):
                pub.send(data, zmq.NOBLOCK)

    async def _sequence_batch(self, batch: list[bytes]) -> list[bytes]:
        """The packed broadcasts to publish, in arrival order; the history ones stored first."""
        out: list[bytes] = []
        pending: dict[str, tuple[Rule, list[tuple[int, float, bytes]]]] = {}
        now = time.time()
        rules, skip = self.rules, len(wire.SEQUENCER_PREFIX)
        for raw in batch:
            data = raw[skip:]
            end = data.find(wire.TOPIC_TERMINATOR)
            try:
                topic = data[:end].decode() if end > 0 else None
            except UnicodeDecodeError:
                topic = None
            if topic is None:
                continue    # a key no client subscribes to: nobody to deliver to
            rule = match(rules, topic)
            if rule is None:
                out.append(data)
                self.passed += 1
                continue
            offset = await self._next_offset(topic)
            if offset is None:   # the store cannot say where the topic stands: live only
                out.append(data)
                continue
            try:
                packed = wire.sequenced(data, format_position(self.epoch, offset).encode())
            except wire.BusFrameError:
                self.heads[topic] = offset - 1
                continue
            pending.setdefault(topic, (rule, []))[1].append((offset, now, packed))
            out.append(packed)
            self.sequenced += 1
        for topic, (rule, items) in pending.items():
            try:
                await self.store.append(topic, rule, items)
                self.stored[topic] = items[-1][0]
            except Exception as exc:
                self._store_failed("append to", topic, exc)
        return out

    async def _next_offset(self, topic: str) -> int | None:
        head = self.heads.get(topic)
        if head is None:
            try:
                head = await self.store.last_offset(topic)
            except Exception as exc:
                self._store_failed("read the last offset of", topic, exc)
                return None
            self.stored[topic] = head
        self.heads[topic] = head + 1
        return head + 1

    def _store_failed(self, what: str, topic: str, exc: Exception) -> None:
        self.store_failures += 1
        if self.store_failures <= 10 or self.store_failures % 1000 == 0:
            log.warning("history store: could not %s %.60r: %s (%d failures so far); "
                        "broadcasts still go out live", what, topic, exc, self.store_failures)

    # --- reads ----------------------------------------------------------------------------
    async def _answer(self, pipe) -> None:
        while True:
            sender, data = await pipe.recv_multipart()
            try:
                read = wire.parse(wire.unpack(data))
                if type(read) is not wire.HistoryRead:
                    raise wire.BusFrameError("not a history read")
                answers = await self.read(read)
            except (wire.BusFrameError, ValueError, UnicodeDecodeError) as exc:
                log.warning("dropped malformed history read from %r: %s", sender[:40], exc)
                continue
            for answer in answers:
                pipe.send_multipart([sender, wire.pack(answer)])

    async def read(self, r: wire.HistoryRead) -> list[list[bytes]]:
        """The answer chunks to one read."""
        self.reads += 1
        topic = r.topic.decode()
        limit = min(int(r.limit), MAX_READ)
        after = int(r.after) if r.after else None
        epoch = self.epoch.encode()
        rule = match(self.rules, topic)
        if rule is None:
            return [wire.history_answer(r.request_id, wire.HISTORY_NONE, epoch, 1, 0, False, b"")]
        try:
            head = self.stored.get(topic)
            if head is None:
                head = self.stored[topic] = await self.store.last_offset(topic)
                self.heads.setdefault(topic, head)
            if after is None:
                after = max(0, head - limit)
            first, entries = await self.store.read(topic, after, rule, time.time(), limit)
        except Exception as exc:
            self._store_failed("read", topic, exc)
            return [wire.history_answer(r.request_id, wire.HISTORY_ERROR, epoch, 1, 0, False, b"")]
        if entries:
            head = max(head, entries[-1][0])
        return self._chunks(r.request_id, epoch, first, head, entries)

    def _chunks(self, request_id: bytes, epoch: bytes, first: int, head: int,
                entries: list[tuple[int, bytes]]) -> list[list[bytes]]:
        chunks, current, size = [], [], 0
        for entry in entries:
            grow = wire.history_entry_size(entry[1])
            if current and size + grow > self.chunk_bytes:
                chunks.append(current)
                current, size = [], 0
            current.append(entry)
            size += grow
        chunks.append(current)
        last = len(chunks) - 1
        return [wire.history_answer(request_id, wire.HISTORY_OK, epoch, first, head, i < last,
                                    wire.pack_history_entries(chunk))
                for i, chunk in enumerate(chunks)]

    # --- the rule table for publishers ----------------------------------------------------
    async def _announce(self, pub) -> None:
        next_expire = 0.0
        expire = getattr(self.store, "expire", None)
        while True:
            pub.send(wire.rules_announcement(self.rules_packed), zmq.NOBLOCK)
            now = time.time()
            if expire is not None and now >= next_expire:
                next_expire = now + EXPIRE_INTERVAL
                expire(now)
            await asyncio.sleep(ANNOUNCE_INTERVAL)
