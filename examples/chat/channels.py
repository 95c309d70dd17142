"""The chat example: the RoomChannel of the Phoenix channels guide, in Python.

Run it with ``zchannels dev examples/chat/channels.py`` and open http://127.0.0.1:4000.
``room:lobby`` is open to everyone; every other ``room:*`` topic is private.
"""
from workers import Channel, Socket, error, noreply, ok, reply


class RoomChannel(Channel):
    # "user_joined" broadcasts go through handle_out, so each client can filter them.
    intercept = ["user_joined"]

    def join(self, topic, payload, socket):
        if topic != "room:lobby":
            return error({"reason": "unauthorized"})
        params = payload if isinstance(payload, dict) else {}
        # Users this client does not want to hear about (join params {"ignore": [...]}).
        socket.assign(ignoring=frozenset(params.get("ignore") or ()))
        # The page asks to be announced; load tests joining thousands of clients do not
        # (every announcement passes through handle_out of every member).
        if params.get("announce"):
            # Pushing or broadcasting is not allowed inside join: announce from handle_info.
            self.send("after_join")
        return ok()

    def handle_info(self, msg, socket):
        if msg == "after_join":
            self.broadcast("user_joined", {"user": socket.assigns["user"]})
        return noreply()

    def handle_in(self, event, payload, socket):
        if event == "new_msg":
            self.broadcast("new_msg", {"body": payload["body"], "user": socket.assigns["user"]})
            return noreply()
        if event == "ping":   # echo: the benchmarks measure push -> reply with it
            return reply("ok", payload)
        return reply("error", {"reason": f"unknown event {event}"})

    def handle_out(self, event, payload, socket):
        if payload.get("user") in socket.assigns["ignoring"]:
            return noreply()   # filtered: this client never sees it
        self.push(event, payload)
        return noreply()


socket = Socket()
socket.channel("room:*", RoomChannel)


@socket.connect
def connect(params, socket, connect_info):
    return socket.assign(user=params.get("user") or "anonymous")
