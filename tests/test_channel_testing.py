"""zchannels.testing itself, on a small app made for it: the loop's clock (timers and async
callbacks cost no real time, real waits stop the jumps), leave/close/shutdown running
terminate, stops and crashes, binary payloads, broadcast_from and intercepts, "disconnect"
to a socket id, duplicate joins, and failures that say what did arrive."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from zchannels.workers import (JSON, Channel, HandlerResult, JoinResult, JSONObject, OutPayload, OutResult,
                     Payload, Socket, SocketState, broadcast, error, noreply, ok, reply, stop)
from zchannels.testing import ANY, ChannelTest, ConnectRefused, JoinRefused

pytestmark = pytest.mark.timeout(10)

terminated: list[tuple[str, Any]] = []


class KitChannel(Channel):
    intercept = ["stamped"]

    def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
        if isinstance(payload, dict) and payload.get("crash"):
            raise RuntimeError("join blew up")
        return ok({"joined": topic})

    async def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        args: dict[str, Any] = payload if isinstance(payload, dict) else {}
        if event == "later":
            self.send_after(args["ms"], args["tag"])
        elif event == "sleep":
            await asyncio.sleep(args["seconds"])
            return reply("ok", {"slept": args["seconds"]})
        elif event == "thread":
            await asyncio.to_thread(time.sleep, args["seconds"])
            return reply("ok", {})
        elif event == "binary":
            return reply("ok", bytes(reversed(payload))) if isinstance(payload, bytes) else reply("error")
        elif event == "shout":
            self.broadcast_from("shout", args)
        elif event == "elsewhere":
            broadcast("news:all", "headline", args)
        elif event == "stop":
            return stop(args["reason"], reply=("ok", {"bye": True}))
        elif event == "raise":
            raise ValueError("handle_in blew up")
        return noreply()

    def handle_info(self, msg: object, socket: SocketState) -> OutResult:
        self.push("info", {"msg": msg})
        return noreply()

    def handle_out(self, event: str, payload: OutPayload, socket: SocketState) -> OutResult:
        if isinstance(payload, dict):
            self.push(event, {**payload, "seen_by": socket.assigns.get("user")})
        return noreply()

    async def terminate(self, reason: Any, socket: SocketState) -> None:
        await asyncio.sleep(1)   # an async terminate: close and leave wait for it
        terminated.append((str(socket.assigns.get("user")), reason))


app = Socket()
app.channel("kit:*", KitChannel)


@app.connect
def connect(params: JSONObject, socket: SocketState, connect_info: JSONObject) -> SocketState | bool | Any:
    if params.get("refuse"):
        return error("go away")
    if params.get("crash"):
        raise RuntimeError("connect blew up")
    return socket.assign(user=params.get("user"), peer=connect_info.get("peer"))


@app.id
def socket_id(socket: SocketState) -> str | None:
    return f"user_socket:{socket.assigns['user']}"


@pytest.fixture
def kit() -> Iterator[ChannelTest]:
    terminated.clear()
    with ChannelTest(app) as harness:
        yield harness


def join(kit: ChannelTest, user: str = "ann", topic: str = "kit:1", **payload: Any) -> Any:
    return kit.connect({"user": user}).subscribe_and_join(topic, payload)


# --- connect and join ------------------------------------------------------------------

def test_connect_passes_params_and_connect_info_and_sets_the_socket_id(kit: ChannelTest) -> None:
    sock = kit.connect({"user": "ann"}, connect_info={"peer": "10.0.0.1"})
    assert sock.assigns == {"user": "ann", "peer": "10.0.0.1"} and sock.id == "user_socket:ann"


def test_a_refused_or_crashing_connect_raises_connect_refused(kit: ChannelTest) -> None:
    with pytest.raises(ConnectRefused, match="go away"):
        kit.connect({"refuse": True})
    with pytest.raises(ConnectRefused, match="connect crashed"):
        kit.connect({"crash": True})


def test_a_crashing_join_is_refused_with_join_crashed(kit: ChannelTest) -> None:
    with pytest.raises(JoinRefused) as refused:
        join(kit, crash=True)
    assert refused.value.response == {"reason": "join crashed"}


def test_the_join_reply_and_the_channels_own_assigns(kit: ChannelTest) -> None:
    chan = join(kit)
    assert chan.response == {"joined": "kit:1"}
    chan.assigns["mine"] = 1
    assert isinstance(chan.channel, KitChannel) and chan.channel.socket.assigns["mine"] == 1


# --- time ------------------------------------------------------------------------------

def test_a_long_timer_fires_when_the_clock_is_advanced_without_real_waiting(kit: ChannelTest) -> None:
    chan = join(kit)
    started = time.monotonic()
    chan.push("later", {"ms": 30_000, "tag": "half a minute"})
    chan.refute_push("info")             # waits 0.1 s
    kit.advance(29.7)
    chan.refute_push("info", timeout=0.1)
    kit.advance(0.1)
    chan.assert_push("info", {"msg": "half a minute"}, timeout=0)
    assert time.monotonic() - started < 1


def test_send_reaches_handle_info(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.send("hello")
    chan.assert_push("info", {"msg": "hello"})


def test_an_async_handler_that_sleeps_is_awaited_in_loop_time(kit: ChannelTest) -> None:
    chan = join(kit)
    started = time.monotonic()
    ref = chan.push("sleep", {"seconds": 60})
    chan.refute_reply(ref, timeout=59)
    chan.assert_reply(ref, "ok", {"slept": 60}, timeout=2)
    assert time.monotonic() - started < 1


def test_a_thread_the_handler_waits_for_stops_the_clock_from_jumping(kit: ChannelTest) -> None:
    chan = join(kit)
    ref = chan.push("thread", {"seconds": 0.05})
    chan.assert_reply(ref, "ok", timeout=5)   # a jump would have ended these 5 s at once


def test_without_autojump_time_is_real() -> None:
    with ChannelTest(app, autojump=False) as real:
        started = time.monotonic()
        real.advance(0.05)
        assert time.monotonic() - started >= 0.05


# --- endings ---------------------------------------------------------------------------

def test_leave_returns_once_terminate_ran_and_replies_ok(kit: ChannelTest) -> None:
    chan = join(kit)
    ref = chan.leave()
    assert terminated == [("ann", ("shutdown", "left"))]
    chan.assert_reply(ref, "ok", {})
    assert chan.state == "closed"


def test_closing_the_connection_terminates_each_of_its_channels(kit: ChannelTest) -> None:
    sock = kit.connect({"user": "ann"})
    one, two = sock.subscribe_and_join("kit:1"), sock.subscribe_and_join("kit:2")
    sock.close()
    assert terminated == [("ann", ("shutdown", "closed"))] * 2
    assert one.state == two.state == "terminated"
    with pytest.raises(RuntimeError, match="terminated"):
        one.push("later", {})


def test_closing_the_test_shuts_the_worker_down(kit: ChannelTest) -> None:
    join(kit)
    kit.close()
    assert terminated == [("ann", "shutdown")]


def test_a_graceful_stop_closes_and_an_abnormal_one_crashes(kit: ChannelTest) -> None:
    graceful, abnormal = join(kit, topic="kit:1"), join(kit, topic="kit:2")
    graceful.assert_reply(graceful.push("stop", {"reason": "normal"}), "ok", {"bye": True})
    graceful.assert_closed()
    abnormal.push("stop", {"reason": "boom"})
    abnormal.assert_crashed()
    assert terminated == [("ann", "normal"), ("ann", "boom")]


def test_a_crash_reports_the_exception_and_terminate_is_not_called(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.push("raise")
    assert "ValueError: handle_in blew up" in (chan.assert_crashed() or "")
    with pytest.raises(AssertionError, match=r"crashed \(phx_error\).*handle_in blew up"):
        chan.assert_closed()
    assert terminated == []


def test_a_disconnect_broadcast_to_the_socket_id_closes_its_connections(kit: ChannelTest) -> None:
    chan = join(kit, user="bob")
    kit.broadcast("user_socket:bob", "disconnect", {})
    kit.advance(5)
    assert chan.socket.closed and chan.state == "terminated"
    assert terminated == [("bob", ("shutdown", "disconnected"))]


def test_a_duplicate_join_replaces_the_channel_without_terminate(kit: ChannelTest) -> None:
    sock = kit.connect({"user": "ann"})
    first = sock.subscribe_and_join("kit:1")
    second = sock.subscribe_and_join("kit:1")
    assert first.state == "terminated" and second.state == "joined"
    kit.advance(5)
    assert terminated == []


# --- payloads and fan-out ---------------------------------------------------------------

def test_binary_pushes_and_replies(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.assert_reply(chan.push("binary", b"\x01\x02\x03"), "ok", b"\x03\x02\x01")


def test_broadcast_from_skips_the_sender_only(kit: ChannelTest) -> None:
    ann, bob = join(kit, "ann"), join(kit, "bob")
    ann.push("shout", {"text": "hey"})
    bob.assert_push("shout", {"text": "hey"})
    ann.refute_push("shout")
    kit.assert_broadcast("kit:1", "shout", {"text": "hey"})


def test_intercepted_events_go_through_handle_out_of_each_channel(kit: ChannelTest) -> None:
    ann, bob = join(kit, "ann"), join(kit, "bob")
    kit.broadcast("kit:1", "stamped", {"n": 1})
    ann.assert_push("stamped", {"n": 1, "seen_by": "ann"})
    bob.assert_push("stamped", {"n": 1, "seen_by": "bob"})


def test_workers_broadcast_from_a_handler_is_recorded(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.push("elsewhere", {"title": "x"})
    kit.assert_broadcast("news:all", "headline", {"title": "x"})
    chan.refute_push("headline")


# --- failures say what arrived --------------------------------------------------------

def test_a_failed_assert_push_lists_the_pushes_received(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.send("one")
    chan.send("two")
    chan.assert_push("info", {"msg": "two"})
    with pytest.raises(AssertionError) as failed:
        chan.assert_push("info", {"msg": "three"})
    text = str(failed.value)
    assert "no push 'info' matching {'msg': 'three'} to 'kit:1' within 100 ms" in text
    assert "'info' {'msg': 'one'}" in text and "'two'" not in text


def test_a_wrong_reply_says_what_it_was(kit: ChannelTest) -> None:
    chan = join(kit)
    ref = chan.push("binary", {"not": "bytes"})
    with pytest.raises(AssertionError, match=r"is 'error' \{\}, expected 'ok'$"):
        chan.assert_reply(ref, "ok")
    with pytest.raises(AssertionError, match="no reply to ref '99'"):
        chan.assert_reply("99", "ok")


def test_refutes_fail_on_what_arrived(kit: ChannelTest) -> None:
    chan = join(kit)
    chan.send("x")
    with pytest.raises(AssertionError, match="unexpected push 'info'"):
        chan.refute_push("info", {"msg": ANY})
    ref = chan.push("sleep", {"seconds": 0})
    with pytest.raises(AssertionError, match="unexpected reply"):
        chan.refute_reply(ref)
    kit.broadcast("kit:1", "b", {})
    with pytest.raises(AssertionError, match="unexpected broadcast 'b'"):
        chan.refute_broadcast("b")
    with pytest.raises(AssertionError, match="(?s)no broadcast 'c' on 'kit:1'.*'b' {}"):
        chan.assert_broadcast("c")
