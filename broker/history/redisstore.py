"""The history store on Redis Streams (`--history-store redis://host:port/db`): history that
outgrows one broker's memory, and survives a broker restart with the same epoch.

One stream per topic, key ``zchannels:h:<topic>``; an entry's id is ``<offset>-1`` (so reading
after an offset is one XRANGE), its fields ``t`` (unix time) and ``m`` (the packed BROADCAST).
The epoch is ``zchannels:epoch``, created once with SET NX: a restarted broker finds it, and its
offsets go on from each stream's last id. Trimming: MAXLEN ~keep on every batch, and MINID for
the time window from a per-topic sample of (time, offset) taken at most once a second; reads
apply both bounds exactly, so the approximate physical trim is never visible.

Redis unreachable while the broker runs: one log line when the outage starts and one when it
ends (a background probe every 0.5 s finds its end); broadcasts are still delivered live, but
not stored, and appends meanwhile return at once (the sequencer publishes a batch after its
append, so live delivery never waits for Redis timeouts, but for the one that detects the
outage). The offsets lost that way are
written back as a marker entry ``<last lost offset>-1`` (field ``x``) as soon as Redis answers
again, with everything older trimmed, so a client whose position is before or inside the gap is
told "position too old" rather than replayed with a hole; and the stream's last id keeps a
restarted broker from giving those offsets again. Reads during the outage raise
``StoreUnavailable``. Redis unreachable when the broker starts is a ``StartupError``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from zchannels.broker.history.store import Rule, new_epoch
from zchannels.bus.startup import StartupError

log = logging.getLogger("broker.history")

KEY_PREFIX = "zchannels:"
# Failures that mean "Redis is not there right now", as opposed to a command Redis refused.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
SAMPLE_EVERY_S = 1.0        # one (time, offset) sample per topic per second for the MINID trim
SAMPLES_MAX = 4096          # per topic; past it the time trim is coarser, reads stay exact
RETRY_EVERY_S = 0.5         # during an outage, Redis is tried again this often


class StoreUnavailable(Exception):
    """The store cannot answer a read now (Redis unreachable); the reader answers "not recovered"."""


def stream_id(offset: int) -> str:
    return f"{offset}-1"


def offset_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def split_url(url: str) -> tuple[str, bool]:
    """(the URL for redis-py, exact trimming?): ``?trim=exact`` asks for MAXLEN without ``~``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    trim = [v for k, v in query if k == "trim"]
    if trim and trim[-1] not in ("exact", "approximate"):
        raise StartupError(f"--history-store {url}: trim must be exact or approximate, not {trim[-1]!r}")
    rest = urlencode([(k, v) for k, v in query if k != "trim"])
    return urlunsplit(parts._replace(query=rest)), bool(trim) and trim[-1] == "exact"


class RedisStore:
    """The ``Store`` protocol (broker/history/store.py) on Redis Streams."""

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX, timeout: float = 2.0) -> None:
        self.url, self.exact = split_url(url)
        self.prefix = prefix
        self.epoch_key = prefix + "epoch"
        self.redis = aioredis.from_url(self.url, socket_timeout=timeout,
                                       socket_connect_timeout=timeout, retry_on_timeout=False)
        self.epoch = ""
        self.down_since: float | None = None
        self.unstored = 0                              # broadcasts not stored in this outage
        self.probe: asyncio.Future[None] | None = None
        self.lost: dict[str, int] = {}                 # topic -> last offset not stored
        self.heads: dict[str, int] = {}                # topic -> last offset appended here
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def key(self, topic: str) -> str:
        return f"{self.prefix}h:{topic}"

    # ---- Store ---------------------------------------------------------------------------

    async def open(self) -> str:
        try:
            await self.redis.set(self.epoch_key, new_epoch(), nx=True)
            epoch = await self.redis.get(self.epoch_key)
        except (RedisError, OSError) as exc:
            raise StartupError(f"--history-store {self.url}: cannot reach Redis ({exc})") from None
        self.epoch = epoch.decode()
        log.info("history store %s: epoch %s", self.url, self.epoch)
        return self.epoch

    async def last_offset(self, topic: str) -> int:
        try:
            last = await self.redis.xrevrange(self.key(topic), count=1)
        except OUTAGE_ERRORS as exc:
            self._down(exc)
            raise StoreUnavailable(str(exc)) from None
        self._up()
        return max(offset_of(last[0][0]) if last else 0, self.lost.get(topic, 0))

    async def append(self, topic: str, rule: Rule, items: Sequence[tuple[int, float, bytes]]) -> None:
        if not items:
            return
        self.heads[topic] = items[-1][0]
        if self.down_since is not None:
            self._not_stored(topic, items)
            return
        key = self.key(topic)
        async with self.redis.pipeline(transaction=False) as pipe:
            lost = dict(self.lost)
            for lost_topic, offset in lost.items():
                self._queue_gap_marker(pipe, self.key(lost_topic), offset)
            last = len(items) - 1
            for i, (offset, when, message) in enumerate(items):
                pipe.xadd(key, {"t": repr(when), "m": message}, id=stream_id(offset),
                          maxlen=rule.keep if i == last else None, approximate=not self.exact)
            minid = self._time_cut(topic, rule, items)
            if minid:
                pipe.xtrim(key, minid=stream_id(minid), approximate=not self.exact)
            try:
                results = await pipe.execute(raise_on_error=False)
            except OUTAGE_ERRORS as exc:
                self._down(exc)
                self._not_stored(topic, items)
                return
        self._up()
        for lost_topic, offset in lost.items():
            if self.lost.get(lost_topic) == offset:
                del self.lost[lost_topic]
        refused = [r for r in results if isinstance(r, ResponseError)
                   and "equal or smaller" not in str(r)]   # a gap marker already written
        if refused:
            log.warning("history store: Redis refused %d of %d commands for %s: %s",
                        len(refused), len(results), topic, refused[0])

    async def read(self, topic: str, after: int, rule: Rule, now: float,
                   limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        key = self.key(topic)
        if self.down_since is not None:
            raise StoreUnavailable(f"{self.url} unreachable")
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(key, count=1)
                pipe.xrange(key, count=1)
                newest, oldest_entry = await pipe.execute()
            head = max(offset_of(newest[0][0]) if newest else 0, self.lost.get(topic, 0))
            first = self._first_kept(head, oldest_entry, rule, topic)
            cutoff = now - rule.seconds
            if oldest_entry and float(oldest_entry[0][1].get(b"t", b"inf")) < cutoff:
                first = max(first, await self._first_in_window(key, first, head, cutoff))
            start = max(after + 1, first)
            if start > head or limit <= 0:
                self._up()
                return first, []
            got = await self.redis.xrange(key, min=f"{start}-0", count=limit)
        except OUTAGE_ERRORS as exc:
            self._down(exc)
            raise StoreUnavailable(str(exc)) from None
        self._up()
        return first, [(offset_of(entry_id), fields[b"m"]) for entry_id, fields in got
                       if b"m" in fields]

    async def close(self) -> None:
        if self.probe is not None:
            self.probe.cancel()
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass

    # ---- trimming and reading helpers ---------------------------------------------------

    def _first_kept(self, head: int, oldest_entry: list, rule: Rule, topic: str) -> int:
        """The oldest offset readable without a hole: keep bound, physical start, outage gap."""
        first = head - rule.keep + 1
        if oldest_entry:
            entry_id, fields = oldest_entry[0]
            physical = offset_of(entry_id) + (1 if b"x" in fields else 0)
            first = max(first, physical)
        else:
            first = max(first, head + 1)
        return max(first, self.lost.get(topic, 0) + 1, 1)

    async def _first_in_window(self, key: str, low: int, head: int, cutoff: float) -> int:
        """The first offset whose time is inside the window (a binary search on offsets, since
        entries are in time order), trimming what is older so the next read is one round trip
        again. The newest entry always stays: it is the head a restarted broker goes on from."""
        high = head + 1
        while low < high:
            mid = (low + high) // 2
            got = await self.redis.xrange(key, min=f"{mid}-0", count=1)
            if not got or self._in_window(got[0][1], cutoff):
                high = mid
            else:
                low = offset_of(got[0][0]) + 1
        got = await self.redis.xrange(key, min=f"{low}-0", count=1) if low <= head else []
        first = offset_of(got[0][0]) if got else head + 1
        await self.redis.xtrim(key, minid=stream_id(min(first, head)), approximate=False)
        return first

    @staticmethod
    def _in_window(fields: dict, cutoff: float) -> bool:
        return b"t" in fields and float(fields[b"t"]) >= cutoff

    def _time_cut(self, topic: str, rule: Rule, items: Sequence[tuple[int, float, bytes]]) -> int:
        """A MINID offset below which every entry is older than the window (0: nothing to cut)."""
        samples = self.samples.get(topic)
        if samples is None:
            samples = self.samples[topic] = deque(maxlen=SAMPLES_MAX)
        offset, when, _ = items[0]
        if not samples or when - samples[-1][0] >= SAMPLE_EVERY_S:
            samples.append((when, offset))
        cutoff = items[-1][1] - rule.seconds
        cut = 0
        # Everything before a sample taken before the cutoff is older than the cutoff.
        while samples and samples[0][0] < cutoff:
            cut = samples.popleft()[1]
        return cut

    def _queue_gap_marker(self, pipe, key: str, offset: int) -> None:
        pipe.xtrim(key, minid=stream_id(offset), approximate=False)
        pipe.xadd(key, {"x": b"1"}, id=stream_id(offset))

    # ---- outage bookkeeping: one line when it starts, one when it ends -------------------

    async def _probe(self) -> None:
        """Try Redis every RETRY_EVERY_S until it answers, then end the outage. A Redis that
        lost its data (no epoch key, or another one) is told apart: every topic this broker
        wrote is then marked lost up to its head, so no read replays with a hole."""
        while True:
            await asyncio.sleep(RETRY_EVERY_S)
            try:
                epoch = await self.redis.get(self.epoch_key)
                break
            except OUTAGE_ERRORS:
                continue
        if epoch is None or epoch.decode() != self.epoch:
            log.error("history store %s came back without this broker's epoch %s (data lost or "
                      "flushed): positions stored before are not recovered", self.url, self.epoch)
            for topic, head in self.heads.items():
                self.lost[topic] = max(self.lost.get(topic, 0), head)
        self._up()

    def _not_stored(self, topic: str, items: Sequence[tuple[int, float, bytes]]) -> None:
        self.lost[topic] = max(self.lost.get(topic, 0), items[-1][0])
        self.unstored += len(items)

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.probe = asyncio.ensure_future(self._probe())
            log.error("history store %s unreachable (%s): broadcasts are delivered live but not "
                      "stored until it is back", self.url, exc or type(exc).__name__)

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning("history store %s reachable again after %.1f s; %d broadcasts were not "
                        "stored", self.url, time.monotonic() - self.down_since, self.unstored)
            self.down_since = None
            self.unstored = 0
