"""The chat example plus two topics that bench/attack.py needs to see inside a worker.

Run by the attack benchmark as ``python -m workers bench/attack_app.py``.  ``room:*`` is the chat
example's RoomChannel, unchanged (the canary joins ``room:lobby``).  Added:

- ``probe:*``: join replies ok with what the edge told ``connect`` about the peer
  (``{"address": ..., "scheme": ..., "x_headers": {...}}``): did it believe forwarding headers?
- ``block:*``: event ``sleep`` blocks the whole worker process with ``time.sleep(payload["s"])``
  (a handler that forgot to be async), then replies ok.  Where do new joins go meanwhile?

The connect callback is the chat example's (anyone, under the name given) plus the peer data.
"""
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:   # the workers may run from another checkout (attack.py --server-root)
    sys.path.append(ROOT)

from examples.chat.channels import RoomChannel  # noqa: E402
from zchannels import Channel, Socket, noreply, ok, reply  # noqa: E402

MAX_BLOCK_S = 60.0   # a bound even for a benchmark typo


class ProbeChannel(Channel):
    def join(self, topic, payload, socket):
        return ok({"peer": socket.assigns.get("peer")})


class BlockChannel(Channel):
    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        if event == "sleep":
            time.sleep(min(float(payload.get("s", 10)), MAX_BLOCK_S))
            return reply("ok", {"slept": payload.get("s", 10)})
        return noreply()


socket = Socket()
socket.channel("room:*", RoomChannel)
socket.channel("probe:*", ProbeChannel)
socket.channel("block:*", BlockChannel)


@socket.connect
def connect(params, socket, connect_info):
    uri = connect_info.get("uri") or {}
    peer = {"address": (connect_info.get("peer_data") or {}).get("address"),
            "scheme": uri.get("scheme"),
            "x_headers": connect_info.get("x_headers") or {}}
    return socket.assign(user=params.get("user") or "anonymous", peer=peer)
