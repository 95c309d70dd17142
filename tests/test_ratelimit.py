"""The per-connection token bucket (edge/ratelimit.py) with a hand-driven clock."""
from __future__ import annotations

from zchannels.edge.ratelimit import MAX_REFUSED, REFUSED_WINDOW, bucket_for


def test_burst_then_the_rate():
    b = bucket_for(10, 5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(0.05)            # half a token
    assert b.take(0.1)                 # one token after 1/10 s
    assert not b.take(0.1)
    assert [b.take(10.0) for _ in range(6)] == [True] * 5 + [False]   # never more than the burst


def test_zero_disables():
    assert bucket_for(0, 400, 0.0) is None
    assert bucket_for(200, 0, 0.0) is None


def test_refusals_close_only_when_they_keep_coming_within_the_window():
    b = bucket_for(1, 1, now=0.0)
    first, close = b.refuse(0.0)
    assert first and not close
    for i in range(MAX_REFUSED - 1):
        first, close = b.refuse(0.001 * i)
        assert not first and not close
    assert b.refuse(1.0) == (False, True)      # refusal number MAX_REFUSED + 1 within the window


def test_refusals_spread_over_windows_do_not_close():
    b = bucket_for(1, 1, now=0.0)
    t = 0.0
    for _window in range(3):
        for _ in range(MAX_REFUSED):
            assert b.refuse(t)[1] is False
        t += REFUSED_WINDOW + 0.01
