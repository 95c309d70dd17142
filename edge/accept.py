"""Accepting TCP connections without spinning when the process is out of file descriptors.

Tornado's accept handler raises on EMFILE and the event loop calls it again at once while
the connection waits in the backlog: a full core and a traceback per try.  Here the edge
logs once, stops accepting for a moment (as Phoenix's acceptor does) and tries again; the
waiting clients are served as soon as descriptors are free.

Each accepted connection is first admitted by ``edge/admission.py`` (pending-connection caps
per peer address and per edge, the descriptor reserve).  A refused one gets a bare ``503``
and is closed at once, before Tornado allocates anything for it.

On a TLS edge (``edge/tls.py``) the admitted socket is wrapped in the server's TLS context and
Tornado gets a ``TLSStream``; the handshake runs on its first reads.  A refused one is closed
without an answer: a plain-text 503 means nothing to a client that expects a TLS handshake.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl

from tornado.iostream import IOStream

from zchannels.edge.admission import Admission
from zchannels.edge.httplimits import EdgeHTTPServer, raw_response
from zchannels.edge.tlstransport import TLSStream

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKEUP = 128
PAUSE_WHEN_FULL = 0.1   # seconds
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
REFUSED = raw_response(503, "Service Unavailable", "too many unfinished connections; retry later",
                       "Retry-After: 1\r\n")


def refuse(conn: socket.socket, answer: bytes = REFUSED) -> None:
    """Answer 503 (``answer``; nothing when empty) and close, without blocking: read what the
    client already sent (so the close is a FIN, not a reset that could discard the answer),
    write the answer, close."""
    try:
        conn.setblocking(False)
        conn.recv(65536)
    except OSError:
        pass
    if answer:
        try:
            conn.send(answer)
        except OSError:
            pass
    conn.close()


class Acceptor:
    def __init__(self, server: EdgeHTTPServer, sock: socket.socket, admission: Admission,
                 tls: ssl.SSLContext | None = None):
        self.server = server
        self.sock = sock
        self.admission = admission
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        self.refused = 0
        sock.setblocking(False)

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def stop(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_FILES:
                    log.error("accept failed: %s", exc)
                    return
                self.refused += 1
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning("out of file descriptors (%s): not accepting for %.1fs (%d times "
                                "so far)", exc.strerror, PAUSE_WHEN_FULL, self.refused)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(PAUSE_WHEN_FULL, self.start)
                return
            slot = self.admission.admit(address[0], address[1], conn.fileno())
            if slot is None:
                refuse(conn, b"" if self.tls else REFUSED)
                continue
            conn.setblocking(False)
            stream = self._stream(conn)
            if stream is None:
                self.admission.closed(slot)
                continue
            self.server.handle_stream(stream, address, slot)

    def _stream(self, conn: socket.socket) -> IOStream | None:
        server = self.server
        if self.tls is None:
            return IOStream(conn, max_buffer_size=server.max_buffer_size,
                            read_chunk_size=server.read_chunk_size)
        try:
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:   # gone already (as in a port scan); ssl.SSLError is one too
            conn.close()
            return None
        return TLSStream(conn, max_buffer_size=server.max_buffer_size,
                         read_chunk_size=server.read_chunk_size)
