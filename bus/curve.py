"""CURVE security for the bus: key files, socket set-up, and the broker's gatekeeper.

Without keys the bus is plain TCP, which is fine on loopback or a private network.  With
keys (made by `zchannels keys DIR`) every bus connection is encrypted and authenticated:
the broker is the CURVE server on all three endpoints (ROUTER, XSUB, XPUB) and admits only
clients whose public key is in its ``--curve-clients`` directory, so a peer without such a
key can neither publish, subscribe nor route.  Edges and workers are CURVE clients on every
socket they connect.  Every admitted key is trusted alike: CURVE decides who is on the bus,
and bus frames from admitted peers are still validated like client input.

Edges and workers create their bus sockets deep inside (``EdgeHub.start``, forked worker
runners), so the CLI loads their keys once per process and ``install``s them, the way
logging is configured; ``secure_client`` applies them right before each ``connect``.

Key files are ZeroMQ certificates (``zmq.auth``): ``NAME.key`` holds the public key,
``NAME.key_secret`` both keys.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("bus.curve")


class CurveError(ValueError):
    """A missing, unreadable or wrong key file; the process says so and exits with 2."""


@dataclass(frozen=True)
class ServerKeys:
    """The broker's keypair and the public keys (z85 -> file name) it admits."""
    public: bytes
    secret: bytes
    clients: dict[bytes, str]
    clients_dir: str


@dataclass(frozen=True)
class ClientKeys:
    """An edge's or worker's keypair and the broker's public key."""
    server: bytes
    public: bytes
    secret: bytes


# --- loading key files ------------------------------------------------------------------

def _require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveError("this libzmq was built without CURVE support (zmq.has('curve') is False)")


def _valid_z85(key: bytes | None) -> bool:
    if key is None or len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (KeyError, ValueError):
        return False


def _read_cert(flag: str, path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.exists(path):
        raise CurveError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise CurveError(f"{flag} {path}: is a directory, expected a key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise CurveError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise CurveError(f"{flag} {path}: not a ZeroMQ certificate (no public-key line); "
                         f"make keys with `zchannels keys DIR`") from None
    if not _valid_z85(public):
        raise CurveError(f"{flag} {path}: the public-key is not a 40-character Z85 key")
    if want_secret:
        if secret is None:
            raise CurveError(f"{flag} {path}: holds no secret key; pass the .key_secret file "
                             f"(the .key file is only the public half)")
        if not _valid_z85(secret):
            raise CurveError(f"{flag} {path}: the secret-key is not a 40-character Z85 key")
        if zmq.curve_public(secret) != public:
            raise CurveError(f"{flag} {path}: its public and secret keys do not belong together")
    return public, secret


def _lax_permissions(path: str) -> str | None:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        return f"{path} holds a secret key and is readable by others (mode {mode:o}); chmod 600 it"
    return None


def load_server_keys(secret_file: str | None, clients_dir: str | None,
                     flags: tuple[str, str] = ("--curve-secret", "--curve-clients")) -> ServerKeys | None:
    """The broker's keys, or None when neither option is given (plain TCP)."""
    if secret_file is None and clients_dir is None:
        return None
    if secret_file is None or clients_dir is None:
        missing = flags[0] if secret_file is None else flags[1]
        raise CurveError(f"{flags[0]} and {flags[1]} go together; {missing} is missing")
    _require_curve()
    public, secret = _read_cert(flags[0], secret_file, want_secret=True)
    if not os.path.isdir(clients_dir):
        raise CurveError(f"{flags[1]} {clients_dir}: no such directory")
    clients: dict[bytes, str] = {}
    for path in sorted(glob.glob(os.path.join(clients_dir, "*.key"))):
        key, _ = _read_cert(f"{flags[1]} file", path, want_secret=False)
        clients[key] = os.path.basename(path)[:-len(".key")]
    if not clients:
        raise CurveError(f"{flags[1]} {clients_dir}: no public keys (*.key) in it, so no edge or "
                         f"worker could connect")
    return ServerKeys(public, secret, clients, clients_dir)


def load_client_keys(server_key_file: str | None, secret_file: str | None,
                     flags: tuple[str, str] = ("--curve-server-key", "--curve-secret")) -> ClientKeys | None:
    """An edge's or worker's keys, or None when neither option is given (plain TCP)."""
    if server_key_file is None and secret_file is None:
        return None
    if server_key_file is None or secret_file is None:
        missing = flags[0] if server_key_file is None else flags[1]
        raise CurveError(f"{flags[0]} and {flags[1]} go together; {missing} is missing")
    _require_curve()
    server, server_secret = _read_cert(flags[0], server_key_file, want_secret=False)
    if server_secret is not None:
        raise CurveError(f"{flags[0]} {server_key_file}: holds the broker's secret key; give "
                         f"edges and workers only the public broker.key")
    public, secret = _read_cert(flags[1], secret_file, want_secret=True)
    return ClientKeys(server, public, secret)


def secret_file_warnings(*paths: str | None) -> list[str]:
    return [w for w in (_lax_permissions(p) for p in paths if p) if w]


def dev_flags(directory: str | None) -> tuple[list[str], list[str]]:
    """(broker flags, edge and worker flags) for a directory made by `zchannels keys`."""
    if directory is None:
        return [], []
    broker_secret = os.path.join(directory, "broker.key_secret")
    broker_public = os.path.join(directory, "broker.key")
    client_secret = os.path.join(directory, "client.key_secret")
    load_server_keys(broker_secret, directory, ("--curve-keys", "--curve-keys"))
    load_client_keys(broker_public, client_secret, ("--curve-keys", "--curve-keys"))
    return (["--curve-secret", broker_secret, "--curve-clients", directory],
            ["--curve-server-key", broker_public, "--curve-secret", client_secret])


# --- sockets ----------------------------------------------------------------------------

_installed: ClientKeys | None = None


def install(keys: ClientKeys | None) -> None:
    """Make ``keys`` this process's bus identity (edges, workers)."""
    global _installed
    _installed = keys


def installed() -> ClientKeys | None:
    return _installed


def secure_client(sock: zmq.Socket, keys: ClientKeys | None = None) -> None:
    """Make ``sock`` a CURVE client of the broker; call before connect.  No keys: no-op."""
    keys = keys or _installed
    if keys is None:
        return
    sock.curve_serverkey = keys.server
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def secure_server(sock: zmq.Socket, keys: ServerKeys | None) -> None:
    """Make ``sock`` a CURVE server; call before bind.  No keys: no-op."""
    if keys is None:
        return
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def silent_broker_hint() -> str:
    """Appended to "no word from the broker" warnings: a key mismatch looks just like that."""
    if _installed is None:
        return ""
    return ("; CURVE is on: check that --curve-server-key is the broker's broker.key and that "
            "this process's public key is in the broker's --curve-clients directory")


# --- the broker's gatekeeper ------------------------------------------------------------

def _every(count: int) -> bool:
    """Rate limit for repeated refusals: peers retry every 100 ms, forever."""
    return count in (1, 10, 100, 1000) or count % 10_000 == 0


class _Authenticator(ThreadAuthenticator):
    """ZAP handler: admits the keys of ``--curve-clients`` and logs each refused key."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys):
        super().__init__(ctx, log=logging.getLogger("broker.zap"))
        self.keys = keys
        self.address = "?"
        self.refused: dict[bytes, int] = {}

    def handle_zap_message(self, msg):
        # The credentials callback below does not get the peer's address; remember it here.
        self.address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        return super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        name = self.keys.clients.get(key)
        if name is not None:
            log.debug("bus peer at %s admitted with key %s", self.address, name)
            return True
        n = self.refused[key] = self.refused.get(key, 0) + 1
        if _every(n):
            log.warning("refused a bus peer at %s: its CURVE key %s is not in --curve-clients %s "
                        "(%d attempt(s) with this key)", self.address, key.decode(errors="replace"),
                        self.keys.clients_dir, n)
        return False


class Gatekeeper:
    """The broker's CURVE side: ZAP authentication and a log of failed handshakes.

    Start it before binding (a connection accepted before the ZAP handler exists would not
    be checked), then ``watch`` the bus sockets' monitor (broker/busmonitor.py) before it
    starts.
    """

    _FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    _REASONS = {
        zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a peer without CURVE keys",
        zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a peer with a wrong broker key (--curve-server-key)",
    }

    def __init__(self, ctx: zmq.Context, keys: ServerKeys):
        self.auth = _Authenticator(ctx, keys)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self.auth)
        self.failures: dict[tuple[str, str], int] = {}

    def watch(self, monitor) -> None:
        """Log the failed handshakes ``monitor`` (a busmonitor.BusMonitor) sees."""
        monitor.add(self._FAILED, self._failed)

    def _failed(self, endpoint: str, event: dict) -> None:
        kind, value = event.get("event", 0), event.get("value", 0)
        if not kind & self._FAILED:   # e.g. MONITOR_STOPPED when the socket closes
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:   # the peer hung up first
            why = "the handshake failed (a peer without CURVE keys, or with a wrong broker key)"
        else:
            why = self._REASONS.get(value, f"protocol error {int(value):#x}")
        n = self.failures[endpoint, why] = self.failures.get((endpoint, why), 0) + 1
        if _every(n):
            log.warning("refused a bus connection on %s: %s (%d so far)", endpoint, why, n)

    def stop(self) -> None:
        self.auth.stop()
