"""Handler module for the recovery tests (tests/test_recovery.py).

The app keeps history for ``hist:*`` (100 broadcasts, 60 s); the tests' broker adds operator
rules (``ops:*``, ``small:*``).  Every topic joins ok.  handle_in events: ``bcast`` ->
broadcast "msg" payload, reply ok {} | ``history`` -> reply ok {"entries": [[event, payload,
position], ...]} of ``await self.history(limit=payload["limit"])``.
"""
from zchannels import Channel, History, Socket, ok, reply


class AnyChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"topic": topic})

    async def handle_in(self, event, payload, socket):
        if event == "bcast":
            self.broadcast("msg", payload)
            return reply("ok", {})
        if event == "history":
            entries = await self.history(limit=payload["limit"])
            return reply("ok", {"entries": [[e.event, e.payload, e.position] for e in entries]})
        return reply("error", {"unknown": event})


history = [History("hist:*", keep=100, seconds=60)]

socket = Socket()
socket.channel("*", AnyChannel)
