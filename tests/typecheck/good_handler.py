"""A handler module using the whole typed surface the way the manual shows it.

Never run: tests/test_typecheck.py has mypy check it (strictly, with the examples), so the
type hints are proven to accept correct code, sync and async, and not only to reject
bad code (bad_handler.py).
"""
from __future__ import annotations

import asyncio

from zchannels import (JSON, BroadcastPayload, Channel, HandlerResult, JoinResult, JSONObject,
                     OutPayload, OutResult, Payload, PresenceState, Socket, SocketState, Timer,
                     TokenError, broadcast, error, noreply, ok, presence_list, reply, sign_token,
                     stop, verify_token)
from zchannels.workers.api import ConnectResult, Reply
from zchannels.workers.token import INFINITY
from zchannels import AsyncPublisher, Publisher, PublishError

SECRET = "a secret key base of at least twenty bytes"


class RoomChannel(Channel):
    intercept = ["user_joined"]

    async def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
        if topic == "room:lobby":
            self.send("after_join")
            return ok({"hello": 1})
        return error("unauthorized")

    async def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        match event, payload:
            case "new_msg", {"body": str(body)}:
                await self.broadcast("new_msg", {"body": body})
                return noreply()
            case "blob", bytes(data):
                self.broadcast_from("blob", data)
                return reply("ok", data)
            case "ping", _:
                return reply("ok", payload)
        if isinstance(payload, dict) and socket.ref is not None:
            return reply("error", {"reason": "unknown", "fields": list(payload)})
        return stop("shutdown", reply=("error", {"reason": "unknown event"}))

    def handle_out(self, event: str, payload: OutPayload, socket: SocketState) -> OutResult:
        if isinstance(payload, dict) and payload.get("user") in socket.assigns.get("ignoring", ()):
            return noreply()
        self.push(event, payload)
        return noreply()

    def handle_info(self, msg: object, socket: SocketState) -> OutResult:
        if msg == "after_join":
            self.track(socket.assigns["user"], {"online_at": 0})
            self.update(socket.assigns["user"], lambda meta: {**meta, "typing": False})
            state: PresenceState = self.presence_list()
            metas = [meta for entry in state.values() for meta in entry["metas"]]
            self.push("presence_state", {"state": state, "count": len(metas)})
            timer: Timer = self.send_after(1000, "tick")
            timer.cancel()
        if msg == "leave":
            self.untrack(socket.assigns["user"])
            return stop("normal")
        return noreply()

    def terminate(self, reason: object, socket: SocketState) -> None:
        broadcast("room:lobby", "left", {"topic": self.topic, "reason": repr(reason)})


class PlainChannel(Channel):
    """A sync override returning what the base class returns (a fall-through clause)."""

    def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        if event == "ping":
            return Reply("ok", None)
        return noreply()


socket = Socket()
socket.channel("room:*", RoomChannel)
socket.channel("plain", PlainChannel, assigns={"plain": True})


@socket.connect
async def connect(params: JSONObject, socket: SocketState, connect_info: JSONObject) -> ConnectResult:
    try:
        user = verify_token(SECRET, "user socket", params.get("token"), max_age=INFINITY)
    except TokenError as exc:
        return error({"reason": exc.reason})
    if not isinstance(user, str):
        return False
    return socket.assign({"user": user}, ignoring=[])


@socket.id
def socket_id(socket: SocketState) -> str | None:
    user = socket.assigns.get("user")
    return f"users_socket:{user}" if isinstance(user, str) else None


def everyone(topic: str) -> list[str]:
    return sorted(presence_list(topic))


def publish(payload: BroadcastPayload) -> bool:
    token: str = sign_token(SECRET, "user socket", {"user": "ada"}, max_age=3600.5)
    with Publisher("tcp://127.0.0.1:5570", curve_server_key=None) as pub:
        pub.wait_connected(5)
        try:
            return pub.broadcast("room:lobby", "new_msg", {"token": token}) and pub.broadcast(
                "room:lobby", "blob", payload)
        except PublishError:
            return False


async def publish_async() -> bool:
    async with AsyncPublisher(unreachable_timeout=1.0) as pub:
        if not await pub.wait_connected(5):
            return False
        return await pub.broadcast("room:lobby", "blob", bytearray(b"\x00"))


if __name__ == "__main__":
    asyncio.run(publish_async())
