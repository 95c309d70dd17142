"""`zchannels keys DIR`: CURVE key files for the bus, and what to pass to which process.

DIR gets a broker keypair (broker.key, broker.key_secret) and one client keypair per
`--name` (default: client.key, client.key_secret).  An existing broker keypair is kept, so
the command also adds client keys later; an existing client key file is never overwritten.
Secret files are created mode 0600 without ever existing with wider permissions.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import zmq
import zmq.auth

from zchannels.bus import curve

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _fail(message: str) -> int:
    print(f"zchannels keys: error: {message}", file=sys.stderr)
    return 2


def _place(src: str, dest: Path, mode: int) -> None:
    """Copy a generated file to its place; O_EXCL makes overwriting impossible, not just checked."""
    data = Path(src).read_bytes()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def main(args) -> int:
    directory = Path(args.dir).resolve()
    names = args.name or ["client"]
    for name in names:
        if not NAME.match(name) or name == "broker":
            return _fail(f"--name {name!r}: use letters, digits, '_', '.', '-' (not 'broker')")
    if len(set(names)) != len(names):
        return _fail("the same --name twice")
    if not zmq.has("curve"):
        return _fail("this libzmq was built without CURVE support (zmq.has('curve') is False)")
    if directory.exists() and not directory.is_dir():
        return _fail(f"{directory} exists and is not a directory")

    taken = [str(directory / f"{n}{ext}") for n in names for ext in (".key", ".key_secret")
             if (directory / f"{n}{ext}").exists()]
    if taken:
        return _fail("refusing to overwrite existing key files: " + ", ".join(taken)
                     + "; choose another --name or move them away")
    broker_public, broker_secret = directory / "broker.key", directory / "broker.key_secret"
    keep_broker = broker_secret.exists()
    if keep_broker != broker_public.exists():
        return _fail(f"{directory} holds only one of broker.key and broker.key_secret; restore the "
                     f"pair or move it away")
    if keep_broker:
        try:
            curve.load_server_keys(str(broker_secret), str(directory))
        except curve.CurveError as exc:
            return _fail(str(exc))

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Generated in a private (0700) scratch directory, then placed with exact modes.
    scratch = tempfile.mkdtemp(prefix=".zchannels-keys-", dir=directory)
    made: list[Path] = []
    try:
        for name in ([] if keep_broker else ["broker"]) + names:
            public, secret = zmq.auth.create_certificates(scratch, name)
            for src, mode in ((public, 0o644), (secret, 0o600)):
                dest = directory / os.path.basename(src)
                _place(src, dest, mode)
                made.append(dest)
    except FileExistsError as exc:   # created by someone else since the check above
        for path in made:
            path.unlink(missing_ok=True)
        return _fail(f"refusing to overwrite {exc.filename}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    _print_usage(directory, names, keep_broker, made)
    return 0


def _print_usage(directory: Path, names: list[str], kept_broker: bool, made: list[Path]) -> None:
    d = str(directory)
    client = names[0]
    print(f"CURVE keys in {d}:")
    for path in made:
        print(f"  wrote {path.name}  (mode {path.stat().st_mode & 0o777:o})")
    if kept_broker:
        print("  kept the existing broker keypair")
    secrets = ", ".join(f"{n}.key_secret" for n in names)
    print(f"""
  broker.key_secret  the broker's secret key: it stays on the broker's machine
  broker.key         the broker's public key: copy it to every edge and worker machine
  {secrets}  client secret key(s): copy each to the edge and worker machines that use it
  *.key              every public key in {d} is admitted by the broker (--curve-clients)

Start the processes with:
  zchannels broker  --bus tcp://0.0.0.0:5570 --curve-secret {d}/broker.key_secret --curve-clients {d}
  zchannels edge    --bus tcp://BROKER:5570 --curve-server-key {d}/broker.key --curve-secret {d}/{client}.key_secret
  zchannels workers --bus tcp://BROKER:5570 --curve-server-key {d}/broker.key --curve-secret {d}/{client}.key_secret APP
  zchannels dev     --curve-keys {d} APP        (all on this machine; uses client.key_secret)

The broker reads --curve-clients when it starts: to revoke a client, delete its .key there and
restart the broker (edges and workers reconnect by themselves).""")
