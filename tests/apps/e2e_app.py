"""Handler module for the end-to-end tests: every protocol behaviour is one event away.

Load it as ``tests/apps/e2e_app.py`` (attr ``socket``).

connect params: ``reject`` (truthy) -> refused with reason "rejected"; ``crash`` -> connect
raises; ``user`` -> assigns["user"]; ``socket_id`` -> the socket id (for "disconnect");
``stamp`` (truthy) -> assigns["stamp"] = a fresh random value per connect (tells a reconnect
from the same connection).

Topics:
- ``echo:*``: join ok, response ``{"joined": topic}`` (join payload ``{"push_in_join": true}``
  tries a push inside join, which crashes the join).  handle_in events:
  ``ping`` -> reply ok payload | ``noreply`` -> nothing | ``error`` -> reply "error" {} |
  ``custom`` -> reply "custom" payload | ``raise`` -> raises (phx_error) |
  ``bad_return`` -> returns 42 (phx_error) | ``stop_normal`` -> stop("normal") (phx_close) |
  ``stop_reply`` -> reply ok {"bye": true} then phx_close | ``stop_crash`` -> stop("boom")
  (phx_error) | ``push`` -> push "pushed" payload, no reply | ``bcast`` -> broadcast "bcast"
  payload, reply ok {} | ``bcast_from`` -> broadcast_from "bcast" payload, reply ok {} |
  ``binary`` -> reply ok with the payload bytes reversed (binary frame), reply error for JSON |
  ``push_after`` -> after 50 ms push "push_after" payload, no reply | ``stop_after`` -> reply
  ok, then stop("normal") after payload["ms"] | ``pid`` -> reply ok
  {"pid": worker pid} | ``assigns`` -> reply ok {"assigns": ..., "id": socket id} |
  ``kick`` -> broadcast payload.get("event", "disconnect") {} to payload["topic"] (a socket
  id), reply ok {} |
  ``flood`` -> broadcast "flood" {"i": i, "pad": "x" * payload["size"]} for i in
  range(payload["n"]), reply ok {}.
- ``private:*``: join error {"reason": "unauthorized"}.
- ``crashjoin:*``: join raises -> {"reason": "join crashed"}.
- ``intercept:*``: like echo, plus intercept ["filtered"]: handle_out pushes "filtered" with
  payload + {"seen_by": assigns["user"]}, unless payload["drop"] is true.  Event
  ``filtered`` broadcasts "filtered" payload and replies ok {}.
- ``slow:*``: like echo, plus ``sleep`` -> await asyncio.sleep(payload["s"]), reply ok payload.
- ``terminate:*``: like echo; terminate broadcasts on "terminations:" + topic the event
  "terminated" {"reason": str(reason)}, e.g. "('shutdown', 'left')".
- ``terminations:*``: like echo (join it to watch terminate:* channels).
- ``defaults:*``: intercepts "filtered" with Channel's default handle_out and handle_info;
  ``filtered`` broadcasts payload, ``info`` sends itself payload; both reply ok {}.
"""
import asyncio
import os
import uuid

from zchannels import Channel, Socket, broadcast, error, noreply, ok, reply, stop


class EchoChannel(Channel):
    def join(self, topic, payload, socket):
        if payload.get("push_in_join"):
            self.push("too_early", {})   # raises RuntimeError: not joined yet
        return ok({"joined": topic})

    def handle_in(self, event, payload, socket):
        if event == "ping":
            return reply("ok", payload)
        if event == "noreply":
            return noreply()
        if event == "error":
            return reply("error")
        if event == "custom":
            return reply("custom", payload)
        if event == "raise":
            raise RuntimeError("raised on purpose by the e2e app")
        if event == "bad_return":
            return 42
        if event == "stop_normal":
            return stop("normal")
        if event == "stop_reply":
            return stop("shutdown", reply=("ok", {"bye": True}))
        if event == "stop_crash":
            return stop("boom")
        if event == "push":
            self.push("pushed", payload)
            return noreply()
        if event == "bcast":
            self.broadcast("bcast", payload)
            return reply("ok")
        if event == "bcast_from":
            self.broadcast_from("bcast", payload)
            return reply("ok")
        if event == "binary":
            if isinstance(payload, bytes):
                return reply("ok", payload[::-1])
            return reply("error", {"reason": "expected a binary payload"})
        if event == "push_after":
            self.send_after(50, ("push_after", payload))
            return noreply()
        if event == "stop_after":
            self.send_after(payload["ms"], ("stop", None))
            return reply("ok")
        if event == "pid":
            return reply("ok", {"pid": os.getpid()})
        if event == "assigns":
            return reply("ok", {"assigns": socket.assigns, "id": socket.id})
        if event == "kick":
            broadcast(payload["topic"], payload.get("event", "disconnect"), {})
            return reply("ok")
        if event == "flood":
            pad = "x" * payload["size"]
            for i in range(payload["n"]):
                self.broadcast("flood", {"i": i, "pad": pad})
            return reply("ok")
        return reply("error", {"reason": f"unknown event {event}"})

    def handle_info(self, msg, socket):
        kind, payload = msg
        if kind == "push_after":
            self.push("push_after", payload)
        if kind == "stop":
            return stop("normal")
        return noreply()


class PrivateChannel(Channel):
    def join(self, topic, payload, socket):
        return error({"reason": "unauthorized"})


class CrashJoinChannel(Channel):
    def join(self, topic, payload, socket):
        raise RuntimeError("join raised on purpose by the e2e app")


class InterceptChannel(EchoChannel):
    intercept = ["filtered"]

    def handle_in(self, event, payload, socket):
        if event == "filtered":
            self.broadcast("filtered", payload)
            return reply("ok")
        return super().handle_in(event, payload, socket)

    def handle_out(self, event, payload, socket):
        if payload.get("drop"):
            return noreply()
        self.push(event, {**payload, "seen_by": socket.assigns.get("user")})
        return noreply()


class DefaultsChannel(Channel):
    """Only join and handle_in: handle_out and handle_info are the defaults of Channel."""
    intercept = ["filtered"]

    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        if event == "info":
            self.send(payload)
        elif event == "filtered":
            self.broadcast("filtered", payload)
        return reply("ok")


class SlowChannel(EchoChannel):
    async def handle_in(self, event, payload, socket):
        if event == "sleep":
            await asyncio.sleep(payload["s"])
            return reply("ok", payload)
        return super().handle_in(event, payload, socket)


class TerminateChannel(EchoChannel):
    async def terminate(self, reason, socket):
        broadcast("terminations:" + self.topic, "terminated", {"reason": str(reason)})


socket = Socket()
socket.channel("echo:*", EchoChannel)
socket.channel("private:*", PrivateChannel)
socket.channel("crashjoin:*", CrashJoinChannel)
socket.channel("intercept:*", InterceptChannel)
socket.channel("slow:*", SlowChannel)
socket.channel("defaults:*", DefaultsChannel)
socket.channel("terminate:*", TerminateChannel)
socket.channel("terminations:*", EchoChannel)


@socket.connect
def connect(params, socket, connect_info):
    if params.get("crash"):
        raise RuntimeError("connect raised on purpose by the e2e app")
    if params.get("reject"):
        return error({"reason": "rejected"})
    socket.assign(user=params.get("user"))
    if params.get("socket_id"):
        socket.assign(socket_id=str(params["socket_id"]))
    if params.get("stamp"):
        socket.assign(stamp=uuid.uuid4().hex)
    return socket


@socket.id
def socket_id(socket):
    return socket.assigns.get("socket_id")


class PresenceChannel(EchoChannel):
    """``presence:*``: tracks assigns["user"] (meta {"tab": join param "tab"}) right after each
    join and pushes "presence_state"; events ``update`` (meta = payload), ``untrack``, ``list``."""

    def join(self, topic, payload, socket):
        self.send(("after_join", {"tab": payload.get("tab")}))
        return ok()

    def handle_info(self, msg, socket):
        kind, meta = msg
        if kind == "after_join":
            self.track(socket.assigns["user"], meta)
            self.push("presence_state", self.presence_list())
            return noreply()
        return super().handle_info(msg, socket)

    def handle_in(self, event, payload, socket):
        if event == "update":
            return reply("ok", {"ref": self.update(socket.assigns["user"], payload)})
        if event == "untrack":
            return reply("ok", {"untracked": self.untrack(socket.assigns["user"])})
        if event == "list":
            return reply("ok", self.presence_list())
        return super().handle_in(event, payload, socket)


socket.channel("presence:*", PresenceChannel)
