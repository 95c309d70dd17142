"""Handler module for bench/chaos.py: every ``room:*`` topic can be joined and answers ``ping``.

Load it as ``bench/chaosapp.py`` (attr ``socket``).  The chaos benchmark's clients push
``ping`` every 500 ms and expect their payload back; the numbered broadcasts they count come
from a Publisher outside the workers, so the channel itself does nothing else.
"""
from zchannels import Channel, Socket, ok, reply


class RoomChannel(Channel):
    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        if event == "ping":
            return reply("ok", payload)
        return reply("error", {"reason": f"unknown event {event}"})


socket = Socket()
socket.channel("room:*", RoomChannel)


@socket.connect
def connect(params, socket, connect_info):
    return socket.assign(client=params.get("client"))
