"""The guide's example (examples/guide/channels.py) plus one event that replies.

The guide's RoomChannel never replies to a push (``new_msg`` is ``{:noreply, socket}``), so
the client tests need one handler more to check push -> reply: ``ping`` answers
``{:reply, {:ok, payload}, socket}``.  Everything else is the guide's own code: the same
``connect``, the same join rules, ``new_msg``, the ``user_joined`` intercept, and any other
event still crashes the channel.
"""
from examples.guide import channels as guide
from zchannels import Socket, reply


class RoomChannel(guide.RoomChannel):
    def handle_in(self, event, payload, socket):
        if event == "ping":
            return reply("ok", payload)
        return super().handle_in(event, payload, socket)


socket = Socket()
socket.channel("room:*", RoomChannel)
socket.connect(guide.connect)
