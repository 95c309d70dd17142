"""Handler module for the wire-order and Phoenix 1.8.x tests (tests/test_e2e_order.py,
tests/test_e2e_phoenix18.py).

Load it as ``tests/apps/protocol_app.py`` (attr ``socket``).

connect: assigns ``user`` (param) and ``auth_token`` (``connect_info["auth_token"]``: the
WebSocket subprotocol token or LongPoll's ``X-Phoenix-AuthToken`` header).

Topics:
- ``echo:*``: join ok ``{"joined": topic}``.  handle_in: ``ping`` -> reply ok payload |
  ``assigns`` -> reply ok the socket's assigns | ``push`` -> push "pushed" payload, no reply |
  ``bcast`` -> broadcast "bcast" payload, reply ok {} | ``raise`` -> raises (phx_error).
- ``slowjoin:*``: join sleeps ``payload["s"]`` seconds (without blocking its worker), then
  ok ``{"joined": topic}``; handle_in as echo.
- ``private:*``: join error ``{"reason": "unauthorized"}``.
"""
import asyncio

from zchannels import Channel, Socket, error, noreply, ok, reply


class EchoChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"joined": topic})

    def handle_in(self, event, payload, socket):
        if event == "ping":
            return reply("ok", payload)
        if event == "assigns":
            return reply("ok", dict(socket.assigns))
        if event == "push":
            self.push("pushed", payload)
            return noreply()
        if event == "bcast":
            self.broadcast("bcast", payload)
            return reply("ok")
        if event == "raise":
            raise RuntimeError("raised on purpose by the protocol app")
        return reply("error", {"reason": f"unknown event {event}"})


class SlowJoinChannel(EchoChannel):
    async def join(self, topic, payload, socket):
        await asyncio.sleep(float(payload.get("s", 0)))
        return ok({"joined": topic})


class PrivateChannel(Channel):
    def join(self, topic, payload, socket):
        return error({"reason": "unauthorized"})


socket = Socket()
socket.channel("echo:*", EchoChannel)
socket.channel("slowjoin:*", SlowJoinChannel)
socket.channel("private:*", PrivateChannel)


@socket.connect
def connect(params, socket, connect_info):
    return socket.assign(user=params.get("user"), auth_token=connect_info.get("auth_token"))
