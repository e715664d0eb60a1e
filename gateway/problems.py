"""HTTP problem responses (RFC 9457 `application/problem+json`): errors become HTTP only here."""

from collections.abc import Mapping

import orjson
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def problem(
    status: int, detail: str, *, title: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """A problem response: `{"type", "title", "status", "detail"}` with `type` "about:blank"
    (RFC 9457 §4.2.1: the title is then the HTTP status phrase)."""
    body = {
        "type": "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )
