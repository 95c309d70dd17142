"""What both transports check and pass on when a client connects: origin, connect_info."""
from __future__ import annotations

from urllib.parse import urlsplit

from tornado.httputil import HTTPServerRequest


def origin_allowed(origin: str | None, host_name: str) -> bool:
    """Same host as the request, as Phoenix's default check_origin does; no Origin is fine."""
    if origin is None:
        return True
    host = urlsplit(origin).hostname
    return host is not None and host.lower() == host_name.lower()


def connect_info(req: HTTPServerRequest, auth_token: str | None, transport: str) -> dict:
    """The connect_info the user's connect receives (Phoenix's keys; cookies are left out)."""
    return {
        "peer_data": {"address": req.remote_ip},
        "uri": {"scheme": req.protocol, "host": req.host_name, "path": req.path, "query": req.query},
        "user_agent": req.headers.get("User-Agent"),
        "x_headers": {k.lower(): v for k, v in req.headers.get_all() if k.lower().startswith("x-")},
        "auth_token": auth_token,
        "transport": transport,
    }
