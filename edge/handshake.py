"""What both transports check and pass on when a client connects: origin, connect_info."""
from __future__ import annotations

from tornado.httputil import HTTPServerRequest

from zchannels.edge.origin import OriginCheck


def origin_allowed(check: OriginCheck, req: HTTPServerRequest, refused) -> bool:
    """The edge's check_origin policy applied to this request; a refusal is counted and logged
    (at most once a second) through ``refused`` (edge/admission.py ``Refusals``)."""
    origins = req.headers.get_list("Origin")
    if check.allows(origins, req.host_name):
        return True
    refused("origin_refusals", "refused %s: origin %.80r not allowed (allowed: %s)", req.remote_ip,
            ", ".join(origins), check.describe())
    return False


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
