"""Step 1 of the guide's token authentication: the token a web app puts in the page for a user.

    ZCHANNELS_SECRET_KEY_BASE=... python examples/guide/user_token.py 42

prints ``Phoenix.Token.sign(conn, "user socket", current_user.id)`` for user id 42 (step 1,
``put_user_token/2``).  Open the guide's page as ``/?token=...``: the page sets
``window.userToken`` from it (step 2), passes it to the socket (step 3), and
examples/guide/channels.py verifies it in ``connect`` with the same secret.
"""
from __future__ import annotations

import argparse
import os
import sys

from zchannels import sign_token

SALT = "user socket"


def put_user_token(secret_key_base: str, current_user_id: int | str) -> str:
    """``put_user_token/2``: the signed token for a logged-in user's id."""
    return sign_token(secret_key_base, SALT, current_user_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("user_id", help="the logged-in user's id (an integer, or any string)")
    args = p.parse_args(argv)
    secret = os.environ.get("ZCHANNELS_SECRET_KEY_BASE")
    if not secret:
        print("user_token: set ZCHANNELS_SECRET_KEY_BASE (at least 20 bytes) to the secret the "
              "workers use", file=sys.stderr)
        return 2
    user_id = int(args.user_id) if args.user_id.lstrip("-").isdigit() else args.user_id
    try:
        print(put_user_token(secret, user_id))
    except ValueError as exc:
        print(f"user_token: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
