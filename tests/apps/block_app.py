"""A handler that can block its worker's whole event loop (time.sleep), for the placement tests.

- ``block:*``: join answers ``{"pid": <worker pid>}``; ``block`` {"s": seconds} sleeps without
  yielding (no heartbeat leaves the worker meanwhile), then replies; any other event replies
  ``{"pid": ...}`` at once.
"""
import os
import time

from zchannels import Channel, Socket, ok, reply

socket = Socket()


class BlockChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"pid": os.getpid()})

    def handle_in(self, event, payload, socket):
        if event == "block":
            time.sleep(float(payload["s"]))
        return reply("ok", {"pid": os.getpid()})


socket.channel("block:*", BlockChannel)
