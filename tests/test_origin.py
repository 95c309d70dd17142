"""The origin check (edge/origin.py, docs/protocol.md §2.5) from tables: Phoenix's check_origin rules
for the default (the request's own host), lists of allowed origins, and the option parsing."""
from __future__ import annotations

import pytest

from zchannels.edge.origin import OriginCheck, OriginParts, parse_allowed

ENTRIES = "https://example.com,//another.com:888,//*.other.com,http://local.test:4000"

# (Origin header value, allowed by ENTRIES?)
LIST_CASES = [
    ("https://example.com", True),
    ("https://example.com:443", True),            # the default port of https, spelt out
    ("https://EXAMPLE.com", True),                # host names are case-insensitive
    ("http://example.com", False),                # scheme given in the entry: must match
    ("https://example.com:8443", False),          # port implied by https: 443 exactly
    ("https://www.example.com", False),           # no wildcard: subdomains are other origins
    ("https://example.com.evil.test", False),
    ("http://another.com:888", True),             # no scheme in the entry: any scheme
    ("wss://another.com:888", True),
    ("https://another.com", False),               # port 443 is not 888
    ("http://another.com", False),
    ("https://other.com", True),                  # *.d matches d itself
    ("http://a.other.com", True),                 # ... and subdomains, any scheme and port
    ("https://a.b.other.com:9999", True),
    ("https://evilother.com", False),             # not a subdomain, only a suffix
    ("https://other.com.evil.test", False),
    ("http://local.test:4000", True),
    ("http://local.test", False),
    ("null", False),                              # sandboxed frames, file: pages
    ("", False),
    ("garbage", False),
    ("http://example.com:notaport", False),
    ("http://[::1", False),
]


@pytest.mark.parametrize("origin,allowed", LIST_CASES, ids=[c[0] or "empty" for c in LIST_CASES])
def test_allowed_origins_list(origin, allowed):
    check = OriginCheck.from_options("true", ENTRIES)
    assert check.allows([origin], "edge.internal") is allowed


# (Origin, Host the request was made to, allowed by the default?)
DEFAULT_CASES = [
    ("http://127.0.0.1:4000", "127.0.0.1", True),
    ("https://127.0.0.1", "127.0.0.1", True),     # Phoenix's default compares the host only
    ("http://chat.example.com", "chat.example.com", True),
    ("http://CHAT.example.com", "chat.example.com", True),
    ("http://evil.example", "127.0.0.1", False),  # cross-site WebSocket hijacking
    ("http://127.0.0.1.evil.example", "127.0.0.1", False),
    ("http://[::1]:4000", "[::1]", True),
    ("null", "127.0.0.1", False),
]


@pytest.mark.parametrize("origin,host,allowed", DEFAULT_CASES, ids=[c[0] for c in DEFAULT_CASES])
def test_default_allows_only_the_requests_own_host(origin, host, allowed):
    assert OriginCheck().allows([origin], host) is allowed


@pytest.mark.parametrize("check", [OriginCheck(), OriginCheck.from_options("true", ENTRIES),
                                   OriginCheck.from_options("false")], ids=["default", "list", "off"])
def test_a_request_without_origin_is_allowed(check):
    """Clients that are not browsers send no Origin (docs/protocol.md §2.5: missing header -> allowed)."""
    assert check.allows([], "127.0.0.1")


def test_check_origin_false_allows_anything():
    check = OriginCheck.from_options("false")
    assert check.allows(["http://evil.example"], "127.0.0.1")
    assert check.allows(["null"], "127.0.0.1")
    assert check.describe() == "off"


def test_two_origin_headers_are_refused():
    assert not OriginCheck().allows(["http://127.0.0.1", "http://127.0.0.1"], "127.0.0.1")


@pytest.mark.parametrize("text,parsed", [
    ("https://example.com", (OriginParts("https", "example.com", 443),)),
    ("//another.com:888", (OriginParts(None, "another.com", 888),)),
    ("//*.other.com", (OriginParts(None, "*.other.com", None),)),
    ("http://x.test, ws://y.test:81 ,", (OriginParts("http", "x.test", 80), OriginParts("ws", "y.test", 81))),
    ("//Mixed.Case.test", (OriginParts(None, "mixed.case.test", None),)),
])
def test_parse_allowed_entries(text, parsed):
    assert parse_allowed(text) == parsed


@pytest.mark.parametrize("text,message", [
    ("example.com", "has no host"),             # Phoenix refuses this too: "//" is needed
    ("https://", "has no host"),
    ("//x.test:99999", "x.test:99999"),
    ("", "lists no origin"),
    (" , ", "lists no origin"),
])
def test_parse_allowed_refuses_entries_without_a_host(text, message):
    with pytest.raises(ValueError, match=message):
        parse_allowed(text)


def test_allowed_origins_with_check_origin_false_is_a_contradiction():
    with pytest.raises(ValueError, match="check-origin false"):
        OriginCheck.from_options("false", "https://example.com")


def test_describe_names_the_policy():
    assert OriginCheck().describe() == "the request's own host"
    assert OriginCheck.from_options("true", "https://example.com,//*.o.test:8").describe() == \
        "https://example.com:443, //*.o.test:8"
