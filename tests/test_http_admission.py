"""The pure parts of the edge's HTTP limits: trusted proxies and forwarded addresses, the
LongPoll body limit, and the admission counts (pending per peer and per edge, the descriptor
reserve, request-body bytes in flight)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tornado.httputil import HTTPHeaders

from zchannels.edge.admission import Admission, Refusals
from zchannels.edge.forwarded import TrustedProxies, parse_networks
from zchannels.edge.httplimits import LONGPOLL_BODY_CEILING, HttpLimits, longpoll_body_limit

ROOT = Path(__file__).resolve().parent.parent


def headers(**values: str) -> HTTPHeaders:
    h = HTTPHeaders()
    for name, value in values.items():
        h.add(name.replace("_", "-"), value)
    return h


# --- forwarded -------------------------------------------------------------------------------------
def test_trusted_proxies_parse_addresses_and_networks_and_name_a_bad_entry():
    assert [str(n) for n in parse_networks(" 10.0.0.0/8, 127.0.0.1 ,::1,")] == \
        ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
    assert parse_networks("") == []
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks("127.0.0.1,10.0.0.0/33")


def test_only_listed_peers_are_trusted():
    trusted = TrustedProxies.parse("10.0.0.0/8,::1")
    assert trusted.trusts("10.2.3.4") and trusted.trusts("::1") and trusted.trusts("::ffff:10.0.0.1")
    assert not trusted.trusts("11.0.0.1") and not trusted.trusts("garbage")
    assert not TrustedProxies().trusts("127.0.0.1")


def test_a_trusted_proxy_names_the_client_and_scheme():
    trusted = TrustedProxies.parse("10.0.0.0/8")
    client = trusted.client
    assert client("10.0.0.1", "http", headers()) == ("10.0.0.1", "http")
    assert client("10.0.0.1", "http", headers(X_Real_Ip="1.2.3.4", X_Forwarded_For="5.5.5.5")) == \
        ("1.2.3.4", "http")
    # The right-most hop that is not a trusted proxy; what the client wrote further left is ignored.
    assert client("10.0.0.1", "http", headers(X_Forwarded_For="6.6.6.6, 8.8.8.8, 10.9.9.9"))[0] == "8.8.8.8"
    assert client("10.0.0.1", "http", headers(X_Forwarded_For="10.1.1.1, 10.2.2.2"))[0] == "10.1.1.1"
    assert client("10.0.0.1", "http", headers(X_Forwarded_For="6.6.6.6, junk"))[0] == "10.0.0.1"
    assert client("10.0.0.1", "http", headers(X_Real_Ip="junk"))[0] == "10.0.0.1"
    assert client("10.0.0.1", "http", headers(X_Forwarded_Proto="http, HTTPS"))[1] == "https"
    assert client("10.0.0.1", "http", headers(X_Scheme="gopher"))[1] == "http"


# --- body limits -----------------------------------------------------------------------------------
def test_the_longpoll_body_limit_follows_the_frame_size_within_bounds():
    assert longpoll_body_limit(1000) == 100 * 1002                      # a full batch of 100
    assert longpoll_body_limit(1_048_576) == LONGPOLL_BODY_CEILING      # at most 8 MiB...
    # ...but one frame fits, in base64 when it is binary
    assert longpoll_body_limit(16 * 1_048_576) == 4 * -(-16 * 1_048_576 // 3) + 2
    limits = HttpLimits(longpoll_body=1, api_body=2, small_body=3)
    assert [limits.body_limit(p) for p in ("/socket/longpoll", "/api/broadcast", "/socket/websocket",
                                           "/metrics")] == [1, 2, 3, 3]


# --- admission -------------------------------------------------------------------------------------
def admission(stats: dict, *, per_peer=2, total=4, inflight=100, trusted="", fd_limit=1024) -> Admission:
    return Admission(total, per_peer, inflight, TrustedProxies.parse(trusted),
                     Refusals(stats, Admission.KINDS), fd_limit=fd_limit)


def test_pending_connections_are_capped_per_peer_and_in_total_and_freed_when_read():
    stats: dict = {}
    adm = admission(stats)
    a1, a2 = adm.admit("127.0.0.2", 1, 10), adm.admit("127.0.0.2", 2, 11)
    assert a1 and a2 and adm.admit("127.0.0.2", 3, 12) is None
    assert stats["pending_peer_refusals"] == 1
    adm.request_read(a1)                       # its request is in: no longer pending
    a3 = adm.admit("127.0.0.2", 4, 12)
    b1, b2 = adm.admit("127.0.0.3", 5, 13), adm.admit("127.0.0.4", 6, 14)
    assert a3 and b1 and b2 and adm.admit("127.0.0.4", 7, 15) is None   # the cap: 4
    assert stats["pending_total_refusals"] == 1
    adm.request_started(a1)                    # keep-alive: waiting for its next request
    assert adm.pending_by_peer["127.0.0.2"] == 3 and adm.pending_total == 5
    for slot in (a1, a2, a3, b1, b2):
        adm.closed(slot)
    assert adm.pending_total == 0 and adm.pending_by_peer == {}


def test_past_the_total_cap_only_addresses_with_nothing_pending_get_in_up_to_an_overflow():
    stats: dict = {}
    adm = admission(stats, per_peer=100, total=4)
    held = [adm.admit("127.0.0.2", i, 10 + i) for i in range(4)]
    assert all(held) and adm.admit("127.0.0.2", 9, 20) is None       # it already has some
    fresh = [adm.admit(f"127.0.1.{i}", 1, 30 + i) for i in range(adm.overflow)]
    assert all(fresh) and adm.admit("127.0.2.1", 1, 99) is None      # the overflow is full too
    assert stats["pending_total_refusals"] == 2


def test_trusted_proxies_are_exempt_from_the_per_peer_cap_only():
    stats: dict = {}
    adm = admission(stats, trusted="127.0.0.1/32")
    slots = [adm.admit("127.0.0.1", i, 10 + i) for i in range(4)]
    assert all(slots) and adm.admit("127.0.0.1", 9, 20) is None
    assert stats["pending_total_refusals"] == 1 and stats["pending_peer_refusals"] == 0


def test_in_the_descriptor_reserve_only_peers_with_nothing_pending_get_in():
    stats: dict = {}
    adm = admission(stats, per_peer=100, total=1000, fd_limit=160)   # reserve: 10, from fd 150
    assert adm.reserve_size == 10 and adm.reserve_from == 150
    hoarder = adm.admit("127.0.0.2", 1, 100)
    assert adm.admit("127.0.0.2", 2, 150) is None                    # already has one pending
    assert stats["descriptor_reserve_refusals"] == 1
    polite = [adm.admit(f"127.0.1.{i}", 1, 150 + i) for i in range(6)]
    assert all(polite[:5]) and polite[5] is None                      # at most half the reserve
    adm.request_read(polite[0])
    assert adm.admit("127.0.1.9", 1, 158) is not None
    assert hoarder and adm.pending_in_reserve == 5


def test_request_body_bytes_in_flight_are_capped_and_released():
    stats: dict = {}
    adm = admission(stats, inflight=100)
    a, b = adm.admit("127.0.0.2", 1, 10), adm.admit("127.0.0.3", 1, 11)
    assert adm.reserve_body(a, 80) and not adm.reserve_body(b, 30) and adm.reserve_body(b, 20)
    adm.request_started(a)                    # a's answer is sent: its bytes are free
    assert adm.body_inflight == 20 and adm.reserve_body(b, 80) and adm.body_inflight == 100
    adm.closed(b)
    assert adm.body_inflight == 0


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit():
    script = ("import resource, logging; logging.basicConfig(level=logging.INFO)\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
              "from edge.admission import raise_nofile_limit\n"
              "print(raise_nofile_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    limit, soft, hard = map(int, run.stdout.split())
    assert limit == soft == hard
    if hard > 256:
        assert f"open files limit raised from 256 to {hard}" in run.stderr
