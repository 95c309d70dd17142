"""Handler module for the restart tests (tests/test_e2e_restart.py).

Load it as ``tests/apps/restart_app.py``.  Environment switches, read at import:
``RESTART_APP_CRASH=1`` -> the process exits with code 3 while loading (a crash at start, not
an import error); ``RESTART_APP_RAISE=1`` -> importing raises (an APP that cannot be imported).

Topic ``echo:*``: join ok; ``ping`` -> reply ok payload; ``pid`` -> reply ok {"pid": pid};
``block`` -> blocks the worker's event loop for payload["s"] seconds in
``block_the_event_loop`` (a stuck worker), then replies ok.
"""
import os
import time

from zchannels import Channel, Socket, ok, reply

if os.environ.get("RESTART_APP_CRASH"):
    os._exit(3)
if os.environ.get("RESTART_APP_RAISE"):
    raise RuntimeError("restart_app refuses to load (RESTART_APP_RAISE is set)")


def block_the_event_loop(seconds: float) -> None:
    time.sleep(seconds)   # on purpose: a handler that never yields


class EchoChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"joined": topic})

    def handle_in(self, event, payload, socket):
        if event == "ping":
            return reply("ok", payload)
        if event == "pid":
            return reply("ok", {"pid": os.getpid()})
        if event == "block":
            block_the_event_loop(payload["s"])
            return reply("ok", payload)
        return reply("error", {"unknown event": event})


socket = Socket()
socket.channel("echo:*", EchoChannel)
