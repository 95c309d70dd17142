"""A worker that blocks right after the broker chose it, once, for tests/test_e2e_stall.py.

"Once" is a file: the first worker to create ``stall_once`` (a path given by the test) writes
its pid into it, blocks its whole event loop for ``s`` seconds (time.sleep: no heartbeat leaves
it meanwhile), appends " done" and answers; every other one answers at once.

- connect: params ``stall_once`` and ``s`` as above; assigns ``{"pid": <pid that accepted>}``.
- ``stall:*``: join payload ``{"stall_once": path, "s": seconds}`` as above, then
  ``ok({"pid": pid, "connected_by": <connect's pid>})``, then pushes ``"hello"`` ``{"pid": pid}``
  (from handle_info, the Phoenix after-join pattern); ``ping`` replies ``{"pid": pid}``;
  terminate broadcasts on ``"terminations:" + topic`` the event ``"terminated"``
  ``{"pid": pid, "reason": str(reason)}``.
- ``terminations:*``: join it to watch.
"""
import os
import time

from zchannels import Channel, Socket, broadcast, noreply, ok, reply

MAX_BLOCK_S = 30.0


def stall_once(path, seconds) -> None:
    if not path:
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    time.sleep(min(float(seconds), MAX_BLOCK_S))
    os.write(fd, b" done")
    os.close(fd)


class StallChannel(Channel):
    def join(self, topic, payload, socket):
        stall_once(payload.get("stall_once"), payload.get("s", 0))
        self.send("after_join")
        return ok({"pid": os.getpid(), "connected_by": socket.assigns.get("pid")})

    def handle_info(self, msg, socket):
        self.push("hello", {"pid": os.getpid()})
        return noreply()

    def handle_in(self, event, payload, socket):
        return reply("ok", {"pid": os.getpid()})

    def terminate(self, reason, socket):
        broadcast("terminations:" + self.topic, "terminated", {"pid": os.getpid(), "reason": str(reason)})


class WatchChannel(Channel):
    def join(self, topic, payload, socket):
        return ok()


socket = Socket()
socket.channel("stall:*", StallChannel)
socket.channel("terminations:*", WatchChannel)


@socket.connect
def connect(params, socket, connect_info):
    stall_once(params.get("stall_once"), params.get("s", 0))
    return socket.assign(pid=os.getpid())
