"""Handler code with a deliberate mistake on every line marked ``# error: [code]``.

Never run: tests/test_typecheck.py has mypy check it and asserts that mypy reports exactly
the marked lines, with the marked error codes: the type hints of the handler API and the
publisher catch these mistakes before a worker does.
"""
from __future__ import annotations

from zchannels import (JSON, Channel, HandlerResult, JoinResult, JSONObject, OutPayload, OutResult,
                     Payload, Socket, SocketState, broadcast, error, noreply, ok, reply,
                     sign_token, stop)
from zchannels import Publisher

SECRET = "a secret key base of at least twenty bytes"


class RoomChannel(Channel):
    intercept = "user_joined"  # error: [assignment]

    def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
        if topic == "room:lobby":
            return ok({1: "one"})  # error: [dict-item]
        return noreply()  # error: [return-value]

    def handle_in(self, event: str, payload: Payload, socket: SocketState) -> HandlerResult:
        if event == "bare":
            return "ok"  # error: [return-value]
        if event == "status":
            return reply(200, {})  # error: [arg-type]
        if event == "set":
            return reply("ok", {"a", "b"})  # error: [arg-type]
        if event == "stop":
            return stop("normal", reply=("ok", object()))  # error: [arg-type]
        if event == "body":
            return reply("ok", payload["body"])  # error: [index, call-overload]
        return ok()  # error: [return-value]

    def handle_out(self, event: str, payload: OutPayload, socket: SocketState) -> OutResult:
        self.push(event, ["not", "an", "object"])  # error: [arg-type]
        return reply("ok")  # error: [return-value]


class WrongReturn(Channel):
    def handle_in(self, event: str, payload: Payload, socket: SocketState) -> str:  # error: [override]
        return "ok"


class WrongPayload(Channel):
    async def handle_info(self, msg: object, socket: SocketState) -> OutResult:
        self.track("ada", "online")  # error: [arg-type]
        return noreply()

    def handle_out(self, event: str, payload: dict[str, str], socket: SocketState) -> OutResult:  # error: [override]
        return noreply()


socket = Socket()
socket.channel("room:*", dict)  # error: [arg-type]


@socket.connect  # error: [type-var]
def connect(params: JSONObject, socket: SocketState) -> bool:
    return True


@socket.id  # error: [type-var]
def socket_id(socket: SocketState) -> int:
    return 1


broadcast("room:lobby", "new_msg", "text")  # error: [arg-type]
error(42)  # error: [arg-type]
sign_token(SECRET, "user socket", "ada", max_age="two weeks")  # error: [arg-type]
Publisher().broadcast("room:lobby", "new_msg", [1, 2])  # error: [arg-type]
