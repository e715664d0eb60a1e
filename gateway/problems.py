"""HTTP problem responses (RFC 9457 `application/problem+json`): errors become HTTP only here."""

from collections.abc import Mapping

import orjson
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
"""HTTP status phrases (RFC 9110 §15) of the statuses the gateway answers with a problem."""

_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})
"""The members RFC 9457 §3.1 defines; an extension member may not take one of these names."""


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, object] | None = None,
) -> Response:
    """A problem response: `{"type", "title", "status", "detail"}` with `type` "about:blank"
    (RFC 9457 §4.2.1: the title is then the HTTP status phrase), followed by the extension
    members `extensions` (RFC 9457 §3.2), whose values must be JSON-serializable (orjson).

    Raises ValueError when an extension member is named like a member of RFC 9457 §3.1.
    """
    body: dict[str, object] = {
        "type": "about:blank",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if extensions:
        clash = sorted(_MEMBERS.intersection(extensions))
        if clash:
            raise ValueError(f"extension members {clash} would replace RFC 9457 members")
        body.update(extensions)
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )
