"""Self-signed TLS certificates for the tests (openssl on PATH), as the docs make them.

    cert, key = make_cert(tmp_path)      # for 127.0.0.1 (CN and IP subjectAltName)

A client that takes ``cert`` as its CA (Python's ``cafile``, Node's NODE_EXTRA_CA_CERTS)
verifies the server as usual, so certificate checking stays on in the tests.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")


def make_cert(directory: Path, name: str = "edge") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, valid two days, and its unencrypted key."""
    if OPENSSL is None:
        raise RuntimeError("openssl is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key
