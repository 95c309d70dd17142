"""The subset of Erlang's external term format (ETF) that Phoenix.Token payloads need.

Phoenix signs ``:erlang.term_to_binary({data, signed_at_ms, max_age_s})``, so a Python
verifier or minter that interoperates with a real Phoenix app must read and write ETF
(docs/protocol.md §8.3, §8.5).  Only plain data is supported: integers, floats, binaries, atoms,
lists, tuples and maps.  Executable or node-bound terms (funs, pids, ports, refs) and
anything else are refused with ``EtfError``, like ``Plug.Crypto.non_executable_binary_to_term``.

Python <-> Erlang:

==================  ===========================================  ============================
Python              encoded as                                   decoded from
==================  ===========================================  ============================
``True``/``False``  atoms ``true`` / ``false``                   same
``None``            atom ``nil`` (Elixir's)                      ``nil``
``int``             97 / 98 / 110 / 111 (small, i32, bignums)    same
``float``           70 (IEEE-754 f64)                            70
``str``             binary 109, UTF-8                            a binary that is valid UTF-8
``bytes``           binary 109                                   any other binary
``Atom("x")``       atom 119 / 118                               atoms 119, 118, 100, 115
``list``            108 ... 106, or 106 when empty               108 (proper lists), 106, 107
``tuple``           104 / 105                                    104 / 105
``dict``            map 116 (keys of any supported type)         116
==================  ===========================================  ============================

Other atoms decode to ``Atom``, a ``str`` subclass: ``Atom("user") == "user"``.
"""
from __future__ import annotations

import math
import struct

__all__ = ["Atom", "EtfError", "encode", "decode"]

VERSION = 131
MAX_DEPTH = 100          # nesting limit on decode: a token is small, a deep one is hostile

_SPECIAL_ATOMS = {"true": True, "false": False, "nil": None}


class Atom(str):
    """An Erlang atom; encodes as an atom rather than a binary."""
    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


class EtfError(ValueError):
    """The bytes are not a term of the supported subset."""


# --- encoding -------------------------------------------------------------------------------

def encode(term: object) -> bytes:
    """``term_to_binary(term)`` for the types in the module table; TypeError for any other."""
    out = bytearray([VERSION])
    _encode(term, out)
    return bytes(out)


def _encode(term: object, out: bytearray) -> None:
    if term is True or term is False or term is None:
        _encode_atom("nil" if term is None else ("true" if term else "false"), out)
    elif isinstance(term, Atom):
        _encode_atom(str(term), out)
    elif isinstance(term, int):
        _encode_int(term, out)
    elif isinstance(term, float):
        if not math.isfinite(term):
            raise TypeError(f"Erlang has no float {term!r}")
        out += struct.pack(">Bd", 70, term)
    elif isinstance(term, str):
        _encode_binary(term.encode("utf-8"), out)
    elif isinstance(term, (bytes, bytearray, memoryview)):
        _encode_binary(bytes(term), out)
    elif isinstance(term, list):
        if term:
            out += struct.pack(">BI", 108, len(term))
            for item in term:
                _encode(item, out)
        out.append(106)
    elif isinstance(term, tuple):
        out += struct.pack(">BB", 104, len(term)) if len(term) < 256 else struct.pack(">BI", 105, len(term))
        for item in term:
            _encode(item, out)
    elif isinstance(term, dict):
        out += struct.pack(">BI", 116, len(term))
        for key, value in term.items():
            _encode(key, out)
            _encode(value, out)
    else:
        raise TypeError(f"cannot encode {type(term).__name__} {term!r} as an Erlang term; "
                        "supported: None, bool, int, float, str, bytes, Atom, list, tuple, dict")


def _encode_atom(name: str, out: bytearray) -> None:
    raw = name.encode("utf-8")
    if len(raw) < 256:
        out += struct.pack(">BB", 119, len(raw)) + raw
    elif len(raw) < 65536:
        out += struct.pack(">BH", 118, len(raw)) + raw
    else:
        raise TypeError(f"atom too long ({len(raw)} bytes)")


def _encode_int(n: int, out: bytearray) -> None:
    if 0 <= n <= 255:
        out += struct.pack(">BB", 97, n)
    elif -2**31 <= n < 2**31:
        out += struct.pack(">Bi", 98, n)
    else:
        # Bignums: byte count, sign, magnitude little-endian (SMALL_BIG_EXT / LARGE_BIG_EXT).
        mag = abs(n)
        raw = mag.to_bytes((mag.bit_length() + 7) // 8, "little")
        head = struct.pack(">BB", 110, len(raw)) if len(raw) < 256 else struct.pack(">BI", 111, len(raw))
        out += head + bytes([n < 0]) + raw


def _encode_binary(raw: bytes, out: bytearray) -> None:
    out += struct.pack(">BI", 109, len(raw)) + raw


# --- decoding -------------------------------------------------------------------------------

def decode(data: bytes) -> object:
    """``binary_to_term(data)`` for the supported subset; EtfError for anything else,
    including trailing bytes."""
    data = bytes(data)
    if not data or data[0] != VERSION:
        raise EtfError("not an Erlang term (no version byte 131)")
    term, pos = _Decoder(data).term(1, 0)
    if pos != len(data):
        raise EtfError(f"{len(data) - pos} trailing bytes after the term")
    return term


class _Decoder:
    __slots__ = ("data", "tags")

    def __init__(self, data: bytes):
        self.data = data
        self.tags = {
            97: self.small_int, 98: self.int32, 110: self.small_big, 111: self.large_big,
            70: self.new_float, 109: self.binary, 119: self.small_atom_utf8, 118: self.atom_utf8,
            100: self.atom_latin1, 115: self.small_atom_latin1, 106: self.nil, 107: self.string,
            108: self.list, 104: self.small_tuple, 105: self.large_tuple, 116: self.map,
        }

    def take(self, pos: int, n: int) -> tuple[bytes, int]:
        end = pos + n
        if end > len(self.data):
            raise EtfError(f"truncated term: needs {n} bytes at offset {pos}")
        return self.data[pos:end], end

    def unpack(self, fmt: str, pos: int) -> tuple[tuple, int]:
        raw, pos = self.take(pos, struct.calcsize(fmt))
        return struct.unpack(fmt, raw), pos

    def count(self, fmt: str, pos: int) -> tuple[int, int]:
        (n,), pos = self.unpack(fmt, pos)
        if n > len(self.data) - pos:   # every element takes at least one byte
            raise EtfError(f"count {n} at offset {pos} exceeds the data")
        return n, pos

    def term(self, pos: int, depth: int) -> tuple[object, int]:
        if depth > MAX_DEPTH:
            raise EtfError(f"terms nested deeper than {MAX_DEPTH}")
        raw, pos = self.take(pos, 1)
        handler = self.tags.get(raw[0])
        if handler is None:
            raise EtfError(f"unsupported term tag {raw[0]} at offset {pos - 1}")
        return handler(pos, depth + 1)

    def small_int(self, pos, depth):
        return self.take(pos, 1)[0][0], pos + 1

    def int32(self, pos, depth):
        (n,), pos = self.unpack(">i", pos)
        return n, pos

    def small_big(self, pos, depth):
        (n,), pos = self.unpack(">B", pos)
        return self.big(n, pos)

    def large_big(self, pos, depth):
        n, pos = self.count(">I", pos)
        return self.big(n, pos)

    def big(self, n, pos):
        raw, pos = self.take(pos, n + 1)
        if raw[0] > 1:
            raise EtfError(f"bad bignum sign byte {raw[0]}")
        mag = int.from_bytes(raw[1:], "little")
        return (-mag if raw[0] else mag), pos

    def new_float(self, pos, depth):
        (x,), pos = self.unpack(">d", pos)
        return x, pos

    def binary(self, pos, depth):
        n, pos = self.count(">I", pos)
        raw, pos = self.take(pos, n)
        try:
            return raw.decode("utf-8"), pos
        except UnicodeDecodeError:
            return raw, pos

    def atom(self, raw: bytes, encoding: str):
        try:
            name = raw.decode(encoding)
        except UnicodeDecodeError:
            raise EtfError("atom name is not valid UTF-8") from None
        return _SPECIAL_ATOMS[name] if name in _SPECIAL_ATOMS else Atom(name)

    def small_atom_utf8(self, pos, depth):
        (n,), pos = self.unpack(">B", pos)
        raw, pos = self.take(pos, n)
        return self.atom(raw, "utf-8"), pos

    def atom_utf8(self, pos, depth):
        (n,), pos = self.unpack(">H", pos)
        raw, pos = self.take(pos, n)
        return self.atom(raw, "utf-8"), pos

    def atom_latin1(self, pos, depth):
        (n,), pos = self.unpack(">H", pos)
        raw, pos = self.take(pos, n)
        return self.atom(raw, "latin-1"), pos

    def small_atom_latin1(self, pos, depth):
        (n,), pos = self.unpack(">B", pos)
        raw, pos = self.take(pos, n)
        return self.atom(raw, "latin-1"), pos

    def nil(self, pos, depth):
        return [], pos

    def string(self, pos, depth):
        # term_to_binary writes a list of integers 0..255 as STRING_EXT ([1, 2, 3] in Elixir).
        (n,), pos = self.unpack(">H", pos)
        raw, pos = self.take(pos, n)
        return list(raw), pos

    def list(self, pos, depth):
        n, pos = self.count(">I", pos)
        items = []
        for _ in range(n):
            item, pos = self.term(pos, depth)
            items.append(item)
        tail, pos = self.take(pos, 1)
        if tail[0] != 106:
            raise EtfError("improper lists are not supported")
        return items, pos

    def small_tuple(self, pos, depth):
        (n,), pos = self.unpack(">B", pos)
        return self.tuple(n, pos, depth)

    def large_tuple(self, pos, depth):
        n, pos = self.count(">I", pos)
        return self.tuple(n, pos, depth)

    def tuple(self, n, pos, depth):
        items = []
        for _ in range(n):
            item, pos = self.term(pos, depth)
            items.append(item)
        return tuple(items), pos

    def map(self, pos, depth):
        n, pos = self.count(">I", pos)
        result = {}
        for _ in range(n):
            key, pos = self.term(pos, depth)
            value, pos = self.term(pos, depth)
            try:
                result[key] = value
            except TypeError:
                raise EtfError(f"unhashable map key {type(key).__name__}") from None
        return result, pos
