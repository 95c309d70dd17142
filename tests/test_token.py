"""Phoenix.Token (workers/token.py) and its Erlang term subset (workers/etf.py).

Vectors from docs/protocol.md §8.6; verify rules from §8.4. Only the clock is mocked
(`workers.token._now_ms`).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import math
import struct

import pytest
from hypothesis import given, settings, strategies as st

from zchannels import workers
from zchannels.workers import etf, token as tok
from zchannels.workers.etf import Atom, EtfError
from zchannels.workers.token import INFINITY, TokenError, sign, verify

SECRET = "abc123" * 5          # docs/protocol.md §8.6: 30 bytes
SALT = "user auth"
SIGNED_AT = 1_700_000_000      # seconds; 1_700_000_000_000 ms in the payload
VECTOR_TOKEN = "SFMyNTY.g2gDYSpuBgAAaOXPiwFiAAFRgA.HqG4ANkHiyPwLF2eA0_3hyGwbqi7-FT6h-X9GeEgWrE"
VECTOR_42_HEX = "83 68 03 61 2a 6e 06 00 00 68 e5 cf 8b 01 62 00 01 51 80"
VECTOR_USER_HEX = "8368036d00000006757365722d316e06000068e5cf8b016200015180"


@pytest.fixture
def clock(monkeypatch):
    """Set the verifier's clock: clock(ms)."""
    def set_ms(ms: int) -> None:
        monkeypatch.setattr(tok, "_now_ms", lambda: ms)
    set_ms(SIGNED_AT * 1000 + 1000)
    return set_ms


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def key(secret: str = SECRET, salt: str = SALT) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), 1000, 32)


def forge(payload: bytes | str, header: str = "SFMyNTY", digest: str = "sha256",
          secret: str = SECRET, salt: str = SALT) -> str:
    """A token with a valid MAC over any payload text (the signer is trusted, the content is not)."""
    payload_text = payload if isinstance(payload, str) else b64(payload)
    plain = f"{header}.{payload_text}"
    return f"{plain}.{b64(hmac.new(key(secret, salt), plain.encode(), digest).digest())}"


def reason(*args, **kwargs) -> str:
    with pytest.raises(TokenError) as info:
        verify(*args, **kwargs)
    return info.value.reason


# ---- §8.6 vectors ---------------------------------------------------------------------------

def test_sign_reproduces_the_phoenix_test_vector_for_42():
    assert sign(SECRET, SALT, 42, signed_at=SIGNED_AT) == VECTOR_TOKEN
    payload = base64.urlsafe_b64decode(VECTOR_TOKEN.split(".")[1] + "==")
    assert payload == bytes.fromhex(VECTOR_42_HEX)


def test_payload_for_user_1_matches_the_vector_hex():
    token = sign(SECRET, SALT, "user-1", signed_at=SIGNED_AT)
    payload = base64.urlsafe_b64decode(token.split(".")[1] + "==")
    assert payload.hex() == VECTOR_USER_HEX
    assert etf.encode(("user-1", SIGNED_AT * 1000, 86_400)).hex() == VECTOR_USER_HEX


def test_verify_accepts_the_vector_within_its_day(clock):
    assert verify(SECRET, SALT, VECTOR_TOKEN) == 42
    clock(SIGNED_AT * 1000 + 86_400_000)          # exactly signed_at + max_age: still valid
    assert verify(SECRET, SALT, VECTOR_TOKEN) == 42
    clock(SIGNED_AT * 1000 + 86_400_001)
    assert reason(SECRET, SALT, VECTOR_TOKEN) == "expired"


def test_workers_package_re_exports_the_token_api():
    assert workers.sign_token is sign and workers.verify_token is verify
    assert workers.TokenError is TokenError
    assert {"sign_token", "verify_token", "TokenError", "Channel", "Socket"} <= set(workers.__all__)


# ---- round trips ----------------------------------------------------------------------------

NESTED = [
    None, True, False, 0, 255, 256, -1, 2**31 - 1, -2**31, 2**31, -2**31 - 1, 2**64, -2**300, 2**2100,
    1.5, -0.0, "", "user-1", "héllo ✓ 🎉", b"\xff\x00\xfe", [], [1, "two", [3.0, None]], (1, "x"), (),
    {"user": {"id": 7, "roles": ["admin", "dev"], "flags": {"beta": True}}, "n": [{"a": [{}]}]},
    {"ids": list(range(300))}, Atom("user"),
]


@pytest.mark.parametrize("data", NESTED, ids=lambda d: repr(d)[:40])
def test_sign_then_verify_returns_the_data(data):
    assert verify(SECRET, SALT, sign(SECRET, SALT, data)) == data


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    | st.tuples(children, children),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_etf_round_trips_json_like_data(data):
    assert etf.decode(etf.encode(data)) == data


@settings(max_examples=50, deadline=None)
@given(json_like)
def test_token_round_trips_json_like_data(data):
    assert verify(SECRET, SALT, sign(SECRET, SALT, data)) == data


def test_bytes_that_are_not_utf8_stay_bytes_and_utf8_binaries_become_str():
    assert etf.decode(etf.encode(b"\xff")) == b"\xff"
    assert etf.decode(etf.encode(b"abc")) == "abc"     # an Elixir string is a binary


def test_sign_refuses_data_without_an_erlang_term():
    for bad in (object(), {1, 2}, float("nan"), float("inf")):
        with pytest.raises(TypeError):
            sign(SECRET, SALT, bad)


# ---- the Erlang term subset -----------------------------------------------------------------

# term_to_binary/1 output of OTP 26 for these terms.
ERLANG_BYTES = [
    (True, "83770474727565"),
    (None, "8377036e696c"),
    (-1, "8362ffffffff"),
    (2**31, "836e040000000080"),
    (-(2**40), "836e0601000000000001"),
    (1.5, "83463ff8000000000000"),
    ({"a": 1}, "8374000000016d000000016161" + "01"),
    ([1, "a"], "836c00000002" + "6101" + "6d0000000161" + "6a"),
    ((), "836800"),
]


@pytest.mark.parametrize("term, hexbytes", ERLANG_BYTES, ids=lambda v: str(v)[:20])
def test_etf_encodes_like_term_to_binary(term, hexbytes):
    assert etf.encode(term).hex() == hexbytes
    assert etf.decode(bytes.fromhex(hexbytes)) == term


@pytest.mark.parametrize("hexbytes, term", [
    ("83 64 0004 74727565", True),                  # ATOM_EXT (OTP < 26)
    ("83 73 05 66616c7365", False),                 # SMALL_ATOM_EXT
    ("83 76 0003 6e696c", None),                    # ATOM_UTF8_EXT
    ("83 77 04 75736572", "user"),                  # other atoms -> str
    ("83 6b 0003 010203", [1, 2, 3]),               # STRING_EXT: Elixir [1, 2, 3]
    ("83 6f 00000002 01 0001", -256),               # LARGE_BIG_EXT
    ("83 69 00000001 61 07", (7,)),                 # LARGE_TUPLE_EXT
    ("83 74 00000001 77 02 6964 61 07", {"id": 7}),  # atom keys (%{id: 7}) -> str keys
])
def test_etf_decodes_other_encodings_elixir_produces(hexbytes, term):
    value = etf.decode(bytes.fromhex(hexbytes.replace(" ", "")))
    assert value == term
    assert isinstance(value, type(term))          # True, not 1


@pytest.mark.parametrize("hexbytes, fragment", [
    ("", "version"),
    ("70", "version"),
    ("83", "truncated"),
    ("83 6d 00000005 6162", "count"),
    ("83 61 01 61", "trailing"),
    ("83 6c 00000001 61 01 61 02", "improper"),     # [1 | 2]
    ("83 71 77 06 65726c616e67 77 04 68616c74 61 00", "tag 113"),    # fun erlang:halt/0
    ("83 58 77 0d 6e6f6e6f6465406e6f686f7374 00000001 00000000 00000000", "tag 88"),  # pid
    ("83 5a 0001 77 01 61 00000000 00000001", "tag 90"),             # reference
    ("83 50 00000003 789c", "tag 80"),              # compressed
    ("83 74 00000001 6a 61 01", "unhashable"),       # %{[] => 1}
    ("83 6e 01 02 01", "sign"),
])
def test_etf_decode_refuses_terms_outside_the_subset(hexbytes, fragment):
    with pytest.raises(EtfError, match=fragment):
        etf.decode(bytes.fromhex(hexbytes.replace(" ", "")))


def test_etf_decode_refuses_deep_nesting_instead_of_recursing():
    deep = b"\x83" + b"\x6c\x00\x00\x00\x01" * 5000 + b"\x6a" * 5001
    with pytest.raises(EtfError, match="deeper"):
        etf.decode(deep)


# ---- verify rules (§8.4) --------------------------------------------------------------------

def test_missing_token_is_missing():
    for empty in (None, "", b""):
        assert reason(SECRET, SALT, empty) == "missing"


def test_token_older_than_its_max_age_is_expired(clock):
    clock(SIGNED_AT * 1000 + 11_000)
    token = sign(SECRET, SALT, "u", signed_at=SIGNED_AT, max_age=10)
    assert reason(SECRET, SALT, token) == "expired"
    old = sign(SECRET, SALT, "u", signed_at=SIGNED_AT - 86_401)
    assert reason(SECRET, SALT, old) == "expired"


def test_max_age_zero_or_negative_is_always_expired(clock):
    token = sign(SECRET, SALT, "u", signed_at=SIGNED_AT)
    assert reason(SECRET, SALT, token, max_age=0) == "expired"
    assert reason(SECRET, SALT, token, max_age=-5) == "expired"
    assert reason(SECRET, SALT, sign(SECRET, SALT, "u", signed_at=SIGNED_AT, max_age=0)) == "expired"


def test_token_from_the_future_is_invalid(clock):
    token = sign(SECRET, SALT, "u", signed_at=SIGNED_AT + 60)
    assert reason(SECRET, SALT, token) == "invalid"


def test_max_age_option_overrides_the_embedded_one(clock):
    clock(SIGNED_AT * 1000 + 60_000)
    short = sign(SECRET, SALT, "u", signed_at=SIGNED_AT, max_age=10)
    assert reason(SECRET, SALT, short) == "expired"
    assert verify(SECRET, SALT, short, max_age=120) == "u"
    long = sign(SECRET, SALT, "u", signed_at=SIGNED_AT)
    assert reason(SECRET, SALT, long, max_age=30) == "expired"
    assert verify(SECRET, SALT, long, max_age=60.5) == "u"


@pytest.mark.parametrize("forever", [INFINITY, math.inf, "infinity"])
def test_infinity_never_expires(clock, forever):
    ancient = sign(SECRET, SALT, "u", signed_at=1, max_age=forever)
    assert etf.decode(base64.urlsafe_b64decode(ancient.split(".")[1] + "=="))[2] == Atom("infinity")
    assert bytes.fromhex("7708") + b"infinity" in base64.urlsafe_b64decode(ancient.split(".")[1] + "==")
    assert verify(SECRET, SALT, ancient) == "u"
    assert verify(SECRET, SALT, sign(SECRET, SALT, "u", signed_at=1), max_age=forever) == "u"
    assert reason(SECRET, SALT, ancient, max_age=10) == "expired"


def test_old_style_infinity_atom_and_older_payload_shapes_verify(clock):
    at = SIGNED_AT * 1000
    atom_ext = b"\x83\x68\x03\x61\x07" + etf.encode(at)[1:] + b"\x64\x00\x08infinity"
    assert verify(SECRET, SALT, forge(atom_ext)) == 7
    assert verify(SECRET, SALT, forge(etf.encode((7, at)))) == 7                      # {data, signed}
    assert verify(SECRET, SALT, forge(etf.encode({Atom("data"): 7, Atom("signed"): at}))) == 7
    clock(at + 86_400_001)
    assert reason(SECRET, SALT, forge(etf.encode((7, at)))) == "expired"


@pytest.mark.parametrize("term", [
    ("u", SIGNED_AT * 1000, "infinity"),      # a binary, not the atom
    ("u", SIGNED_AT * 1000, None),
    ("u", float(SIGNED_AT * 1000), 60),
    ("u", True, 60),
    ["u", SIGNED_AT * 1000, 60],
    ("u",),
    "u",
])
def test_payload_of_the_wrong_shape_is_invalid(clock, term):
    assert reason(SECRET, SALT, forge(etf.encode(term))) == "invalid"


def test_payload_with_a_fun_or_pid_is_invalid_even_when_signed(clock):
    at = etf.encode(SIGNED_AT * 1000)[1:]
    fun = bytes.fromhex("7177066572" "6c616e6777046861" "6c746100")
    pid = bytes.fromhex("587704") + b"a@hb" + bytes(12)
    for data in (fun, pid):
        assert reason(SECRET, SALT, forge(b"\x83\x68\x03" + data + at + b"\x62\x00\x00\x00\x3c")) == "invalid"


def test_tampered_payload_or_signature_is_invalid(clock):
    token = sign(SECRET, SALT, {"user": "ann"}, signed_at=SIGNED_AT)
    header, payload, mac = token.split(".")
    other = sign(SECRET, SALT, {"user": "bob"}, signed_at=SIGNED_AT).split(".")[1]
    assert reason(SECRET, SALT, f"{header}.{other}.{mac}") == "invalid"
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    assert reason(SECRET, SALT, f"{header}.{payload}.{flipped}") == "invalid"
    assert reason(SECRET, SALT, f"{header}.{payload}.{mac[:-2]}") == "invalid"
    assert reason(SECRET, SALT, f"{header}.{payload}.") == "invalid"


def test_wrong_salt_secret_or_key_options_are_invalid(clock):
    token = sign(SECRET, SALT, "u", signed_at=SIGNED_AT)
    assert reason(SECRET, "user socket", token) == "invalid"
    assert reason("x" * 30, SALT, token) == "invalid"
    assert reason(SECRET, SALT, token, key_iterations=2000) == "invalid"
    assert reason(SECRET, SALT, token, key_digest="sha512") == "invalid"
    custom = sign(SECRET, SALT, "u", signed_at=SIGNED_AT, key_iterations=10, key_length=64,
                  key_digest="sha512")
    assert verify(SECRET, SALT, custom, key_iterations=10, key_length=64, key_digest="sha512") == "u"


def test_hs384_and_hs512_headers_verify_and_unknown_headers_do_not(clock):
    payload = etf.encode(("u", SIGNED_AT * 1000, 60))
    assert verify(SECRET, SALT, forge(payload, "SFMzODQ", "sha384")) == "u"
    assert verify(SECRET, SALT, forge(payload, "SFM1MTI", "sha512")) == "u"
    assert reason(SECRET, SALT, forge(payload, "SFMzODQ", "sha256")) == "invalid"
    for header in ("SFMyNTZ", "eyJhbGciOiJIUzI1NiJ9", "", "sfmynty"):
        assert reason(SECRET, SALT, forge(payload, header)) == "invalid"


@pytest.mark.parametrize("token", [
    forge("g2gDYSpuBgAAaOXPiwFiAAFRgA=="),                 # padded
    forge("g2gDYSpuBgAAaOXPiwFiAAFRgA+"),                  # standard alphabet
    forge("g2gDYSpuBgAAaOXPiwFiAAFRg"),                    # impossible length
    forge("not base64!"),
    "SFMyNTY.g2gDYSpuBgAAaOXPiwFiAAFRgA.***",
    "SFMyNTY.g2gDYSpuBgAAaOXPiwFiAAFRgA",
    "SFMyNTY.a.b.c",
    "SFMyNTY.ü.x",
    "just text",
])
def test_malformed_tokens_are_invalid(clock, token):
    assert reason(SECRET, SALT, token) == "invalid"


def test_non_string_tokens_are_invalid():
    for token in (42, ["SFMyNTY"], {"t": 1}):
        assert reason(SECRET, SALT, token) == "invalid"


def test_bytes_tokens_verify(clock):
    assert verify(SECRET, SALT, VECTOR_TOKEN.encode()) == 42


# ---- keys -----------------------------------------------------------------------------------

def test_secret_key_base_shorter_than_20_bytes_is_a_value_error():
    for short in ("x" * 19, b"", "ü" * 9):
        with pytest.raises(ValueError, match="at least 20 bytes"):
            sign(short, SALT, 1)
        with pytest.raises(ValueError, match="at least 20 bytes"):
            verify(short, SALT, "anything")
    assert verify("ü" * 10, SALT, sign("ü" * 10, SALT, 1)) == 1    # 20 bytes of UTF-8


def test_bad_options_are_errors_not_token_failures():
    with pytest.raises(ValueError, match="key_digest"):
        sign(SECRET, SALT, 1, key_digest="md5")
    with pytest.raises(TypeError, match="max_age"):
        sign(SECRET, SALT, 1, max_age="soon")
    with pytest.raises(TypeError, match="max_age"):
        verify(SECRET, SALT, VECTOR_TOKEN, max_age=True)


def test_key_derivation_runs_once_per_secret_and_salt():
    tok._derive.cache_clear()
    for _ in range(5):
        verify(SECRET, "cached salt", sign(SECRET, "cached salt", 1))
    info = tok._derive.cache_info()
    assert (info.misses, info.hits) == (1, 9)
    assert tok._key(SECRET, SALT, 1000, 32, "sha256") == key()


def test_verify_compares_signatures_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(tok.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    verify(SECRET, SALT, VECTOR_TOKEN, max_age=INFINITY)
    assert calls == [1]


def test_struct_layout_of_big_timestamps():
    # signed_at_ms values are bignums (tag 110, little-endian magnitude), as Erlang writes them.
    raw = etf.encode(1_700_000_000_000)
    assert raw[:4] == b"\x83\x6e\x06\x00"
    assert int.from_bytes(raw[4:], "little") == 1_700_000_000_000
    assert struct.unpack(">i", etf.encode(-2**31)[2:])[0] == -2**31
