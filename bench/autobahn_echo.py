"""The edge's WebSocket layer as an echo server, for the Autobahn|Testsuite's fuzzing client.

The edge's own ``WebSocketProtocol`` (or ``DeflateWebSocketProtocol`` with ``--compress``)
parses every frame; in place of the Phoenix connection an echo consumer sends each message
back, after the one check the Phoenix serializer makes on a text message (valid UTF-8:
undecodable text closes 1007, as an undecodable Phoenix frame does).

    .venv/bin/python bench/autobahn_echo.py --port 9001 [--compress]
    # then, with the testsuite (Python 2) installed apart from the project's environment:
    wstest -m fuzzingclient -s spec.json   # servers: [{"agent": "zchannels", "url": "ws://127.0.0.1:9001"}]

It prints ``READY ws://127.0.0.1:PORT`` when listening and runs until interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zchannels.edge.hub import Limits  # noqa: E402
from zchannels.edge.websocket import accept_value  # noqa: E402
from zchannels.edge.wsdeflate import DeflateWebSocketProtocol, negotiate  # noqa: E402
from zchannels.edge.wsproto import CLOSE_BAD_DATA, OP_TEXT, InboundBudget, WebSocketProtocol  # noqa: E402


class Hub:
    """What a WebSocketProtocol needs of the edge's hub."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.stats = {"bad_frames": 0, "slow_consumer_closes": 0, "close_aborts": 0}
        self.inbound_budget = InboundBudget(limits.max_inbound_buffered, self.stats)


class EchoConsumer:
    """In place of edge.connection.Connection: no rate limit, nothing to tell anyone."""

    label = "autobahn"

    def control_in(self) -> bool:
        return True

    def on_transport_closed(self) -> None:
        pass


class Echo:
    """Mixed into a protocol class: a whole message goes back as it came."""

    __slots__ = ()

    def _deliver(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                return self._fail(CLOSE_BAD_DATA, "invalid UTF-8 in a text message")
        self.send(payload, opcode != OP_TEXT)


class PlainEcho(Echo, WebSocketProtocol):
    __slots__ = ()


class DeflateEcho(Echo, DeflateWebSocketProtocol):
    __slots__ = ()


class Upgrade(asyncio.Protocol):
    """Reads the upgrade request, answers 101, then hands the transport to an echo protocol."""

    def __init__(self, hub: Hub, compress: bool):
        self.hub, self.compress, self.head = hub, compress, bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > 65536:
                self.transport.close()
            return
        head, _, rest = bytes(self.head).partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept_value(headers.get('sec-websocket-key', ''))}\r\n")
        deflate = negotiate(headers.get("sec-websocket-extensions", "")) if self.compress else None
        if deflate:
            response += f"Sec-WebSocket-Extensions: {deflate}\r\n"
        cls = DeflateEcho if deflate else PlainEcho
        proto = cls(self.hub, lambda _t: EchoConsumer(), (response + "\r\n").encode())
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if rest:
            proto.data_received(rest)


async def serve(port: int, compress: bool, max_size: int) -> None:
    hub = Hub(Limits(max_frame_size=max_size, max_outbound=64 * 1_048_576,
                     max_inbound_buffered=256 * 1_048_576))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upgrade(hub, compress), "127.0.0.1", port)
    print(f"READY ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--compress", action="store_true", help="agree permessage-deflate")
    parser.add_argument("--max-frame-size", type=int, default=32 * 1_048_576,
                        help="Autobahn 9.x sends messages of 16 MiB (default: %(default)s)")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.run(serve(args.port, args.compress, args.max_frame_size))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
