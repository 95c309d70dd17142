"""Phoenix.Token for Python: sign and verify tokens a Phoenix app can read, and the reverse.

A web app mints a token for a logged-in user and hands it to the page; the page passes it
to phoenix.js (``params: {token}`` or the ``authToken`` option) and the handler's
``connect`` verifies it.  The format is Phoenix's (docs/protocol.md §8), so tokens minted by
``Phoenix.Token.sign/4`` in Elixir verify here and the other way round, given the same
``secret_key_base`` and salt::

    from zchannels.workers.token import sign, verify, TokenError

    token = sign(SECRET_KEY_BASE, "user socket", {"user_id": 42})
    try:
        data = verify(SECRET_KEY_BASE, "user socket", token, max_age=14 * 86400)
    except TokenError as exc:
        print("refused:", exc.reason)          # "expired", "invalid" or "missing"

Tokens are signed, not encrypted: anyone holding one can read its data.  Data is anything
``workers.etf`` encodes (JSON-like values; tuples stay tuples, atoms from Elixir come back
as ``str``).  Only the standard library is used.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import time
from typing import Literal, TypeAlias

from zchannels.workers.etf import Atom, EtfError, decode, encode

__all__ = ["sign", "verify", "TokenError", "INFINITY", "MaxAge"]

#: ``max_age=INFINITY`` (or ``math.inf``): the token never expires, like ``max_age: :infinity``.
INFINITY = Atom("infinity")

DEFAULT_MAX_AGE = 86_400

#: Seconds, or ``INFINITY`` (also ``math.inf`` or ``"infinity"``): a token never expires.
MaxAge: TypeAlias = int | float | Atom | Literal["infinity"]
_SIGN_HEADER = "SFMyNTY"                              # b64url("HS256")
_HEADERS = {b"SFMyNTY": "sha256", b"SFMzODQ": "sha384", b"SFM1MTI": "sha512"}
_KEY_DIGESTS = {"sha": "sha1", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256",
                "sha384": "sha384", "sha512": "sha512"}
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TokenError(Exception):
    """A token that does not verify; ``reason`` is ``"invalid"``, ``"expired"`` or ``"missing"``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sign(secret_key_base: str | bytes, salt: str | bytes, data: object, *,
         max_age: MaxAge = DEFAULT_MAX_AGE, signed_at: int | float | None = None,
         key_iterations: int = 1000, key_length: int = 32, key_digest: str = "sha256") -> str:
    """Sign ``data`` like ``Phoenix.Token.sign(secret_key_base, salt, data, opts)``.

    ``max_age`` (seconds, default one day) is embedded and used by ``verify`` unless it is
    given one of its own; ``INFINITY`` / ``math.inf`` never expires.  ``signed_at`` is the
    signing time in seconds since the epoch (default now).  The ``key_*`` options must be
    the same on both sides.  TypeError for data that has no Erlang term.
    """
    key = _key(secret_key_base, salt, key_iterations, key_length, key_digest)
    signed_at_ms = _now_ms() if signed_at is None else math.trunc(signed_at * 1000)
    payload = encode((data, signed_at_ms, _option_max_age(max_age)))
    plain = f"{_SIGN_HEADER}.{_b64encode(payload)}"
    mac = hmac.new(key, plain.encode("ascii"), "sha256").digest()
    return f"{plain}.{_b64encode(mac)}"


def verify(secret_key_base: str | bytes, salt: str | bytes, token: str | bytes | None, *,
           max_age: MaxAge | None = None, key_iterations: int = 1000,
           key_length: int = 32, key_digest: str = "sha256") -> object:
    """Return the data of a token made by ``sign`` (or Phoenix.Token) with this key and salt.

    Raises ``TokenError``: ``"missing"`` for ``None`` or an empty token, ``"invalid"`` for a
    bad format or signature, another key or salt, or a token signed in the future,
    ``"expired"`` when older than ``max_age`` seconds (this argument, else the age
    embedded at signing; ``INFINITY`` / ``math.inf`` never expires, ``<= 0`` always has).
    """
    key = _key(secret_key_base, salt, key_iterations, key_length, key_digest)
    limit = None if max_age is None else _option_max_age(max_age)
    if token is None or token == "" or token == b"":
        raise TokenError("missing")
    payload = _check_signature(key, token)
    try:
        term = decode(payload)
    except EtfError as exc:
        raise TokenError("invalid", f"payload: {exc}") from None
    data, signed_at_ms, embedded = _unpack(term)
    if limit is None:
        limit = _embedded_max_age(embedded)
    # The order of Plug.Crypto (docs/protocol.md §8.4): :infinity is always valid, then a max_age
    # <= 0 has expired, then a token from the future is invalid, then the age is checked.
    if isinstance(limit, Atom):   # INFINITY, the only atom a max_age can be
        return data
    if limit <= 0:
        raise TokenError("expired")
    now = _now_ms()
    if signed_at_ms > now:
        raise TokenError("invalid", "signed in the future")
    if signed_at_ms + math.trunc(limit * 1000) < now:
        raise TokenError("expired")
    return data


def _check_signature(key: bytes, token: str | bytes) -> bytes:
    """The payload bytes of a well-formed token whose MAC matches (docs/protocol.md §8.1), else TokenError."""
    if isinstance(token, str):
        try:
            token = token.encode("ascii")
        except UnicodeEncodeError:
            raise TokenError("invalid", "not ASCII") from None
    if not isinstance(token, bytes):
        raise TokenError("invalid", f"a token is a string, got {type(token).__name__}")
    parts = token.split(b".")
    if len(parts) != 3:
        raise TokenError("invalid", "not three dot-separated parts")
    header, payload_b64, signature_b64 = parts
    digest = _HEADERS.get(header)
    if digest is None:
        raise TokenError("invalid", "unknown header")
    payload, signature = _b64decode(payload_b64), _b64decode(signature_b64)
    # The MAC covers the text as received, as Plug.Crypto.MessageVerifier does.
    expected = hmac.new(key, header + b"." + payload_b64, digest).digest()
    if not hmac.compare_digest(expected, signature):
        raise TokenError("invalid", "bad signature")
    return payload


def _unpack(term: object) -> tuple[object, int, object]:
    # {data, signed_at_ms, max_age_s}; the older {data, signed} and %{data:, signed:} forms
    # are still accepted by Plug.Crypto with one day to live.
    if isinstance(term, tuple) and len(term) == 3:
        data, signed, max_age = term
    elif isinstance(term, tuple) and len(term) == 2:
        (data, signed), max_age = term, DEFAULT_MAX_AGE
    elif isinstance(term, dict) and set(term) == {"data", "signed"}:
        data, signed, max_age = term["data"], term["signed"], DEFAULT_MAX_AGE
    else:
        raise TokenError("invalid", "payload is not {data, signed_at, max_age}")
    if type(signed) is not int:
        raise TokenError("invalid", "signed_at is not an integer")
    return data, signed, max_age


def _embedded_max_age(value: object) -> int | float | Atom:
    # Only the atom :infinity means forever inside a token; the binary "infinity" does not.
    limit = _max_age(value)
    if limit is None or (isinstance(value, str) and not isinstance(value, Atom)):
        raise TokenError("invalid", f"embedded max_age {value!r} is not seconds or :infinity")
    return limit


def _max_age(value: object) -> int | float | Atom | None:
    """Seconds, INFINITY for ``"infinity"`` / ``:infinity`` / ``math.inf``, else None."""
    if isinstance(value, str) and value == "infinity":
        return INFINITY
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return INFINITY if value == math.inf else value
    return None


def _option_max_age(value: object) -> int | float | Atom:
    limit = _max_age(value)
    if limit is None:
        raise TypeError(f"max_age must be seconds (int or float), INFINITY or math.inf, got {value!r}")
    return limit


@functools.lru_cache(maxsize=64)
def _derive(secret: bytes, salt: bytes, iterations: int, length: int, digest: str) -> bytes:
    return hashlib.pbkdf2_hmac(digest, secret, salt, iterations, length)


def _key(secret_key_base: str | bytes, salt: str | bytes, iterations: int, length: int,
         digest: str) -> bytes:
    """PBKDF2 key for this secret and salt (docs/protocol.md §8.2), derived once per process."""
    secret = secret_key_base.encode("utf-8") if isinstance(secret_key_base, str) else secret_key_base
    if not isinstance(secret, bytes) or len(secret) < 20:
        raise ValueError("secret_key_base must be a string or bytes of at least 20 bytes, got "
                         + (f"{len(secret)} bytes" if isinstance(secret, bytes) else repr(type(secret))))
    salt = salt.encode("utf-8") if isinstance(salt, str) else salt
    if not isinstance(salt, bytes):
        raise TypeError(f"salt must be a string or bytes, got {type(salt).__name__}")
    name = _KEY_DIGESTS.get(digest)
    if name is None:
        raise ValueError(f"key_digest must be one of {sorted(_KEY_DIGESTS)}, got {digest!r}")
    if not (isinstance(iterations, int) and iterations > 0 and isinstance(length, int) and length > 0):
        raise ValueError(f"key_iterations and key_length must be positive integers, got "
                         f"{iterations!r}, {length!r}")
    return _derive(secret, salt, iterations, length, name)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: bytes) -> bytes:
    # URL-safe alphabet, no padding (Base.url_decode64(padding: false)); anything else is invalid.
    if len(text) % 4 == 1 or not _B64URL.issuperset(text):
        raise TokenError("invalid", "bad base64")
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("invalid", "bad base64") from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
