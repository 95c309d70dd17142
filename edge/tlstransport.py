"""An asyncio Transport over an established, non-blocking ``ssl.SSLSocket``: the WebSocket fast
path (``edge/wsproto.py``) on a TLS edge.

On a plain edge a WebSocket leaves Tornado after its upgrade for the event loop's own socket
transport (``loop.connect_accepted_socket``).  Over TLS that cannot be done: the TLS session
lives in the ``SSLSocket`` Tornado handshook, and asyncio's SSL transport can only start a
session of its own.  So this class keeps that socket and gives the protocol what the loop's
transport would: ``write`` (sent at once when nothing waits), the write-buffer limits with
``pause_writing`` / ``resume_writing`` (``--max-outbound``), ``pause_reading`` /
``resume_reading``, ``close`` (after the flush, with a TLS close_notify) and ``abort``.

Two OpenSSL rules shape it.  A write that OpenSSL could not finish (``SSLWantWriteError``) must
be retried with the same bytes first; the unsent bytes stay at the front of one buffer, which
only grows at its end, so every retry starts with them.  And either direction may need the
other (``SSLWantReadError`` on a send, ``SSLWantWriteError`` on a receive): the operation then
waits for that readiness instead of its own.  A receive returns at most one TLS record
(16 KiB), so the reader takes up to ``READS_PER_WAKEUP`` records before letting other
connections have a turn.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

from tornado.iostream import SSLIOStream

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
READS_PER_WAKEUP = 16


class TLSStream(SSLIOStream):
    """Tornado's stream for a TLS connection, which can give its socket up to a TLSTransport
    (``release``) without closing it."""

    _released = False

    def release(self) -> ssl.SSLSocket:
        """Stop watching and using the socket (the stream is closed) and return it, open."""
        sock = self.socket
        self._released = True
        self.close()
        return sock

    def close_fd(self) -> None:
        if self._released:
            self.socket = None   # type: ignore[assignment]   (now the transport's)
            return
        super().close_fd()


class TLSTransport(asyncio.Transport):
    """The transport of one WebSocket on a TLS edge; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.Protocol):
        super().__init__({"socket": sock, "peername": _peername(sock), "sslcontext": sock.context,
                          "ssl_object": sock, "cipher": sock.cipher()})
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()       # plaintext OpenSSL has not taken yet
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False    # pause_writing was called
        self._reading = True             # not paused by the protocol
        self._reader = False             # our reader is registered with the loop
        self._writer = False
        self._read_needs_write = False   # a receive got SSLWantWriteError
        self._write_needs_read = False   # a send got SSLWantReadError
        self._closing = False
        self._lost = False
        loop.call_soon(self._start, protocol)

    def _start(self, protocol: asyncio.Protocol) -> None:
        if self._lost:
            return
        protocol.connection_made(self)
        # Tornado may have left decrypted bytes in the SSL object, where no readiness shows.
        self._update_reader()
        self._read_ready()

    # --- writing ---------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._lost or not data:
            return
        if not self._buffer and not self._write_needs_read:
            sent = self._send(data)
            if sent is None or sent == len(data):
                return
            data = data[sent:]
        self._buffer += data
        self._update_writer()
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _send(self, data) -> int | None:
        """Bytes of ``data`` OpenSSL took (0 if it must wait); None after a fatal error."""
        try:
            return self._sock.send(data)
        except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            return 0
        except ssl.SSLWantReadError:
            self._write_needs_read = True
            self._update_reader()
            return 0
        except (OSError, ssl.SSLError) as exc:
            self._fatal(exc)
            return None

    def _flush(self) -> None:
        if not self._buffer:
            return
        with memoryview(self._buffer) as view:
            sent = self._send(view)
        if sent is None:
            return
        del self._buffer[:sent]
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if not self._buffer and self._closing:
            self._finish_close(None)
            return
        self._update_writer()

    def _write_ready(self) -> None:
        if self._read_needs_write:
            self._read_needs_write = False
            self._read_ready()
        if not self._lost:
            self._flush()
            self._update_writer()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = 64 * 1024 if high is None else high
        low = high // 4 if low is None else low
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS WebSocket ends with close(), not a half-close")

    # --- reading ---------------------------------------------------------------------------
    def _read_ready(self) -> None:
        if self._write_needs_read:
            self._write_needs_read = False
            self._flush()
        for _ in range(READS_PER_WAKEUP):
            if not self._reading or self._closing or self._lost:
                break
            try:
                data = self._sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except ssl.SSLWantWriteError:
                self._read_needs_write = True
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._eof()
                return
            self._protocol.data_received(data)
        else:
            # More may be waiting inside the SSL object, where the descriptor shows nothing.
            if self._reading and not self._closing and self._sock.pending():
                self._loop.call_soon(self._read_ready)
        self._update_reader()
        self._update_writer()

    def _eof(self) -> None:
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._reading = False
        self._update_reader()

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        self._update_reader()
        self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # --- the loop's watchers -------------------------------------------------------------------
    def _update_reader(self) -> None:
        want = not self._lost and (self._write_needs_read or (self._reading and not self._closing))
        if want != self._reader:
            self._reader = want
            if want:
                self._loop.add_reader(self._fd, self._read_ready)
            else:
                self._loop.remove_reader(self._fd)

    def _update_writer(self) -> None:
        want = not self._lost and (self._read_needs_write or
                                   (bool(self._buffer) and not self._write_needs_read))
        if want != self._writer:
            self._writer = want
            if want:
                self._loop.add_writer(self._fd, self._write_ready)
            else:
                self._loop.remove_writer(self._fd)

    # --- closing -----------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Stop reading; send what is buffered, then close_notify, then close the socket."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._update_reader()
        if not self._buffer:
            self._finish_close(None)

    def abort(self) -> None:
        """Close at once; buffered bytes are dropped."""
        self._finish_close(None, notify=False)

    def _fatal(self, exc: BaseException) -> None:
        log.debug("TLS WebSocket %s: %s", self.get_extra_info("peername"), exc)
        self._finish_close(exc, notify=False)

    def _finish_close(self, exc: BaseException | None, notify: bool = True) -> None:
        if self._lost:
            return
        self._closing = True
        self._lost = True
        self._buffer = bytearray()
        self._update_reader()
        self._update_writer()
        if notify:
            try:   # close_notify, best effort: a non-blocking unwrap sends it and cannot wait
                self._sock.unwrap()
            except (OSError, ValueError, ssl.SSLError):
                pass
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            self._protocol = None


def _peername(sock: ssl.SSLSocket):
    try:
        return sock.getpeername()
    except OSError:
        return None
