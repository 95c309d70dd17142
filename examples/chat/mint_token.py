"""Mint a chat token for USERNAME: what a web app does after logging a user in.

    ZCHANNELS_SECRET_KEY_BASE=... python examples/chat/mint_token.py ada

prints a Phoenix.Token (salt "user socket", data "ada") that examples/chat/channels.py
accepts for two weeks, given the same ZCHANNELS_SECRET_KEY_BASE; pass it to phoenix.js as
``params: {token}`` or ``authToken``.  A Phoenix app sharing the secret_key_base would mint
the same with ``Phoenix.Token.sign(endpoint, "user socket", "ada")``.
"""
from __future__ import annotations

import argparse
import os
import sys

from zchannels.workers.token import sign

SALT = "user socket"           # the one examples/chat/channels.py verifies with (max_age 2 weeks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("username")
    args = p.parse_args(argv)
    secret = os.environ.get("ZCHANNELS_SECRET_KEY_BASE")
    if not secret:
        print("mint_token: set ZCHANNELS_SECRET_KEY_BASE (at least 20 bytes) to the secret the "
              "workers use", file=sys.stderr)
        return 2
    try:
        token = sign(secret, SALT, args.username, max_age=14 * 86_400)
    except ValueError as exc:
        print(f"mint_token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
