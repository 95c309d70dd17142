"""The history stores: one contract both the memory store and the Redis Streams store keep
(parametrised over both), then what only Redis does (an epoch and offsets that survive a broker
restart, physical trimming, outages). Redis is a real redis-server on a free port."""
from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
import redis

from tests.redisserver import RedisServer, redis_server_fixture
from zchannels.broker.history.memory import MemoryStore
from zchannels.broker.history.redisstore import RedisStore, StoreUnavailable
from zchannels.broker.history.store import Rule
from zchannels.bus.startup import StartupError

pytestmark = pytest.mark.timeout(30)

redis_server = pytest.fixture(scope="module")(redis_server_fixture)

ROOM = Rule("room:*", keep=10, seconds=300)
NOW = 1_700_000_000.0


def message(offset: int) -> bytes:
    return b"msg-%d\x00\xff" % offset          # bytes as they come, a NUL and a non-UTF-8 byte


def items(first: int, last: int, when: float = NOW) -> list[tuple[int, float, bytes]]:
    return [(o, when, message(o)) for o in range(first, last + 1)]


@pytest.fixture(params=["memory", "redis"])
def make_store(request, tmp_path_factory):
    """A function returning a fresh store of each kind (Redis: its own database, flushed)."""
    if request.param == "memory":
        yield MemoryStore
        return
    server = request.getfixturevalue("redis_server")
    redis.Redis(port=server.port).flushall()
    yield lambda: RedisStore(server.url)


def run(store, *steps):
    """Open the store, run the coroutine functions `steps(store)` in order, close; their results."""
    async def scenario():
        await store.open()
        try:
            return [await step(store) for step in steps]
        finally:
            await store.close()
    return asyncio.run(scenario())


# ---- the contract --------------------------------------------------------------------------

def test_the_epoch_is_eight_characters_and_an_unknown_topic_has_offset_zero(make_store):
    async def check(store):
        epoch = await store.open()
        assert re.fullmatch(r"[a-z0-9]{8}", epoch)
        assert await store.last_offset("room:new") == 0
        assert await store.read("room:new", 0, ROOM, NOW, 100) == (1, [])
        await store.close()
    asyncio.run(check(make_store()))


def test_a_read_returns_the_entries_after_the_offset_in_order_at_most_limit(make_store):
    async def steps(store):
        await store.append("room:1", ROOM, items(1, 3))
        await store.append("room:1", ROOM, items(4, 6))
        return (await store.last_offset("room:1"), await store.read("room:1", 0, ROOM, NOW, 100),
                await store.read("room:1", 2, ROOM, NOW, 2), await store.read("room:1", 6, ROOM, NOW, 100))
    [(last, everything, after_two, after_head)] = run(make_store(), steps)
    assert last == 6
    assert everything == (1, [(o, message(o)) for o in range(1, 7)])
    assert after_two == (1, [(3, message(3)), (4, message(4))])
    assert after_head == (1, [])


def test_only_the_last_keep_entries_are_kept(make_store):
    async def steps(store):
        for first in range(1, 26, 5):
            await store.append("room:1", ROOM, items(first, first + 4))
        return await store.read("room:1", 0, ROOM, NOW, 100), await store.read("room:1", 20, ROOM, NOW, 100)
    [((oldest, entries), (oldest_again, newer))] = run(make_store(), steps)
    assert oldest == oldest_again == 16
    assert [o for o, _ in entries] == list(range(16, 26))
    assert [o for o, _ in newer] == list(range(21, 26))


def test_entries_older_than_the_window_are_not_read(make_store):
    rule = Rule("room:*", keep=100, seconds=60)
    async def steps(store):
        await store.append("room:1", rule, items(1, 4, when=NOW - 100))
        await store.append("room:1", rule, items(5, 7, when=NOW - 30))
        return (await store.read("room:1", 0, rule, NOW, 100),
                await store.read("room:1", 0, rule, NOW + 40, 100))
    [(inside, later)] = run(make_store(), steps)
    assert inside == (5, [(o, message(o)) for o in (5, 6, 7)])
    assert later == (8, [])                      # all too old: the head + 1


def test_topics_are_separate_even_when_one_is_a_prefix_of_the_other(make_store):
    async def steps(store):
        await store.append("room:1", ROOM, items(1, 2))
        await store.append("room:10", ROOM, [(1, NOW, b"ten")])
        return (await store.read("room:1", 0, ROOM, NOW, 10), await store.read("room:10", 0, ROOM, NOW, 10),
                await store.last_offset("room:1"), await store.last_offset("room:10"))
    [(one, ten, last_one, last_ten)] = run(make_store(), steps)
    assert one == (1, [(1, message(1)), (2, message(2))])
    assert ten == (1, [(1, b"ten")])
    assert (last_one, last_ten) == (2, 1)


# ---- Redis only: restarts ------------------------------------------------------------------

def redis_store(server: RedisServer, **kwargs) -> RedisStore:
    return RedisStore(server.url, **kwargs)


def test_a_restarted_broker_finds_the_same_epoch_and_goes_on_from_the_last_offset(redis_server):
    redis.Redis(port=redis_server.port).flushall()
    async def before(store):
        await store.append("room:1", ROOM, items(1, 5))
        return store.epoch
    async def after(store):
        return store.epoch, await store.last_offset("room:1"), await store.read("room:1", 3, ROOM, NOW, 10)
    [epoch] = run(redis_store(redis_server), before)
    [(epoch_again, last, (oldest, entries))] = run(redis_store(redis_server), after)
    assert epoch_again == epoch
    assert last == 5
    assert (oldest, entries) == (1, [(4, message(4)), (5, message(5))])


def test_a_flushed_redis_gives_a_new_epoch(redis_server):
    redis.Redis(port=redis_server.port).flushall()
    [epoch] = run(redis_store(redis_server), lambda store: asyncio.sleep(0, store.epoch))
    redis.Redis(port=redis_server.port).flushall()
    [epoch_after] = run(redis_store(redis_server), lambda store: asyncio.sleep(0, store.epoch))
    assert epoch_after != epoch


def test_a_redis_that_cannot_be_reached_at_start_is_a_startup_error(tmp_path):
    server = RedisServer(tmp_path)
    server.stop()
    with pytest.raises(StartupError, match=f"127.0.0.1:{server.port}.*cannot reach Redis"):
        asyncio.run(RedisStore(server.url, timeout=1).open())


def test_an_unknown_trim_option_is_a_startup_error():
    with pytest.raises(StartupError, match="trim must be exact or approximate"):
        RedisStore("redis://127.0.0.1:1/0?trim=some")


# ---- Redis only: physical trimming ---------------------------------------------------------

def test_exact_trimming_keeps_exactly_keep_entries_in_the_stream(redis_server):
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    async def steps(store):
        for first in range(1, 300, 50):
            await store.append("room:1", ROOM, items(first, first + 49))
    run(RedisStore(redis_server.url + "?trim=exact"), steps)
    assert client.xlen("zchannels:h:room:1") == ROOM.keep
    run(redis_store(redis_server), steps)        # approximate: bounded, not exact
    assert ROOM.keep <= client.xlen("zchannels:h:room:1") <= 300


def test_entries_older_than_the_window_leave_the_stream(redis_server):
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    rule = Rule("room:*", keep=1000, seconds=60)
    async def steps(store):
        for second in range(0, 120, 2):                       # one entry every 2 s for 2 minutes
            await store.append("room:1", rule, [(second // 2 + 1, NOW + second, message(second))])
        return await store.read("room:1", 0, rule, NOW + 120, 1000)
    [(oldest, entries)] = run(redis_store(redis_server), steps)
    assert [o for o, _ in entries] == list(range(oldest, 61))
    assert oldest == 31                                       # sent at NOW + 60: the window's edge
    assert client.xlen("zchannels:h:room:1") <= 32            # trimmed by MINID, not only filtered


def test_a_restarted_broker_reads_the_window_exactly_and_trims_what_is_older(redis_server):
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    rule = Rule("room:*", keep=1000, seconds=60)
    async def fill(store):
        await store.append("room:1", rule, items(1, 500, when=NOW))
        await store.append("room:1", rule, items(501, 510, when=NOW + 100))
    async def reread(store):
        return await store.read("room:1", 0, rule, NOW + 120, 1000), await store.last_offset("room:1")
    run(redis_store(redis_server), fill)
    [((oldest, entries), last)] = run(redis_store(redis_server), reread)
    assert (oldest, [o for o, _ in entries], last) == (501, list(range(501, 511)), 510)
    assert client.xlen("zchannels:h:room:1") == 10


# ---- Redis only: outages -------------------------------------------------------------------

async def until_reachable(store: RedisStore, timeout: float = 5.0) -> None:
    """Read until the store answers again (it tries Redis again every 0.5 s during an outage)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await store.read("room:probe", 0, ROOM, NOW, 1)
            return
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store never found Redis again"
            await asyncio.sleep(0.05)

def test_an_outage_is_logged_once_appends_never_raise_and_no_read_replays_across_the_gap(tmp_path, caplog):
    """Redis restarted without persistence: the broker's epoch is gone from it, so every topic
    this broker wrote is marked lost up to its head; a read after the outage starts past it."""
    server = RedisServer(tmp_path)
    caplog.set_level(logging.INFO, logger="broker.history")
    async def scenario():
        store = RedisStore(server.url, timeout=1)
        await store.open()
        await store.append("room:1", ROOM, items(1, 3))
        server.stop()
        for offset in range(4, 9):                       # not stored, never raises
            await store.append("room:1", ROOM, items(offset, offset))
        with pytest.raises(StoreUnavailable):
            await store.read("room:1", 0, ROOM, NOW, 10)
        server.start()
        await until_reachable(store)
        await store.append("room:1", ROOM, items(9, 10))
        result = await store.read("room:1", 0, ROOM, NOW, 10), await store.last_offset("room:1")
        await store.close()
        restarted = RedisStore(server.url)
        await restarted.open()
        last_after_restart = await restarted.last_offset("room:1")
        await restarted.close()
        return result, last_after_restart
    try:
        ((oldest, entries), last), last_after_restart = asyncio.run(scenario())
    finally:
        server.stop()
    assert (oldest, [o for o, _ in entries], last) == (9, [9, 10], 10)
    assert last_after_restart == 10
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(unreachable) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]
    assert "5 broadcasts were not stored" in back[0].getMessage()


def test_broadcasts_lost_in_an_outage_leave_a_marker_so_no_read_has_a_hole(redis_server, caplog):
    """Redis paused (its data kept): the offsets not stored meanwhile become a marker, so a read
    from before them is "too old" (oldest after the gap), also for a restarted broker."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    async def scenario():
        store = RedisStore(redis_server.url, timeout=0.3)
        await store.open()
        await store.append("room:1", ROOM, items(1, 3))
        client.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        await store.append("room:1", ROOM, items(4, 5))        # times out: not stored
        assert store.down_since is not None
        await until_reachable(store)
        await store.append("room:1", ROOM, items(6, 7))
        first = await store.read("room:1", 0, ROOM, NOW, 10)
        await store.close()
        restarted = RedisStore(redis_server.url)
        await restarted.open()
        second = await restarted.read("room:1", 0, ROOM, NOW, 10), await restarted.last_offset("room:1")
        await restarted.close()
        return first, second
    first, (second, last) = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert first == second == (6, [(6, message(6)), (7, message(7))])
    assert last == 7
