"""TLS directly on the edge: ``--certfile`` and ``--keyfile`` make it serve https:// and wss://.

The edge's own accept path (``edge/accept.py``) wraps every accepted socket in the context
made here and hands Tornado an ``SSLIOStream``: the handshake runs on the first reads, within
the request's ``--header-timeout``.  LongPoll, ``/status``, ``/metrics``, ``/api/broadcast``
and static files are then plain Tornado over TLS; a WebSocket leaves Tornado after its upgrade
for ``edge/tlstransport.py``, which gives ``edge/wsproto.py`` the transport it expects over the
same TLS connection.

The files are read once, at start-up: a renewed certificate is taken up by restarting the edges
one by one (``docs/deploy.md``).  A handshake that fails (a plain-HTTP request on the TLS port,
a client that does not trust the certificate, a port scanner) closes that connection only; it
is counted in ``tls_handshake_failures`` and logged at most once a second, instead of the line
Tornado writes for each one.
"""
from __future__ import annotations

import logging
import ssl

from zchannels.edge.admission import Refusals

# What browsers and phoenix.js need: HTTP/1.1 (a WebSocket upgrade is an HTTP/1.1 request).
ALPN = ["http/1.1"]
HANDSHAKE_FAILURE_KINDS = ("tls_handshake_failures",)


class TLSConfigError(ValueError):
    """--certfile / --keyfile cannot serve TLS; the text says which file and why."""


def load_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The server context for ``--certfile`` and ``--keyfile`` (PEM files; the certificate file
    may hold the chain after it); None when neither is given.  Raises TLSConfigError when only
    one is given, a file cannot be read, or the pair is not a usable certificate and key."""
    if not certfile and not keyfile:
        return None
    if not certfile or not keyfile:
        given, missing = ("--certfile", "--keyfile") if certfile else ("--keyfile", "--certfile")
        raise TLSConfigError(f"{given} needs {missing} too (TLS takes a certificate and its key)")
    cert_text = _read("--certfile", certfile)
    key_text = _read("--keyfile", keyfile)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise TLSConfigError(f"--certfile {certfile}: no PEM certificate in it "
                             "(a '-----BEGIN CERTIFICATE-----' block)")
    if "PRIVATE KEY-----" not in key_text:
        raise TLSConfigError(f"--keyfile {keyfile}: no PEM private key in it "
                             "(a '-----BEGIN PRIVATE KEY-----' block)")
    if "ENCRYPTED" in key_text:
        raise TLSConfigError(f"--keyfile {keyfile}: the key is encrypted with a passphrase; give "
                             "the edge an unencrypted key file readable only by its user")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"--keyfile {keyfile} is not the key of the certificate in "
                                 f"--certfile {certfile}") from None
        raise TLSConfigError(f"--certfile {certfile} / --keyfile {keyfile}: not a usable "
                             f"certificate and key: {exc}") from None
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"--certfile {certfile} / --keyfile {keyfile}: {exc}") from None
    context.set_alpn_protocols(ALPN)
    return context


def _read(flag: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("ascii", "replace")
    except OSError as exc:
        raise TLSConfigError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise ValueError("the key is encrypted with a passphrase")


class HandshakeFailureLog(logging.Filter):
    """Turns Tornado's one warning per failed TLS handshake into a count and at most one line a
    second (``Refusals``): clients that fail a handshake cannot fill the log."""

    def __init__(self, refusals: Refusals):
        super().__init__()
        self.refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        # tornado/iostream.py: gen_log.warning("SSL Error on %s %s: %s", fileno, peer, err)
        if record.msg != "SSL Error on %s %s: %s" or len(record.args or ()) != 3:
            return True
        _fd, peer, err = record.args
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else peer
        self.refusals("tls_handshake_failures", "TLS handshake with %s failed: %s", where,
                      getattr(err, "reason", None) or err)
        return False


def install_handshake_failure_log(refusals: Refusals) -> None:
    logging.getLogger("tornado.general").addFilter(HandshakeFailureLog(refusals))
