"""`GET /client/userstream.js`: the browser client (PROTOCOL.md §6), served by every gateway.

The module lives in the repository's top-level `client/` folder (its own package, with type
declarations and tests). `gateway/static/userstream.js` is a symbolic link to
`client/userstream.js`: an editable install (`pip install -e .`) reads the repository's file
through it, and a wheel (what deploy/Dockerfile installs) carries the file's bytes, since
setuptools copies what a link points to into the package data (`gateway = ["static/*"]`).

Caching (RFC 9111, RFC 9110 §8.8.3 and §13.1.2): the answer carries a strong `ETag` (a hash
of the bytes) and `Cache-Control: public, max-age=300`, so a browser or proxy reuses it for
five minutes and then revalidates with `If-None-Match`, answered `304 Not Modified` while
the bytes are unchanged. Five minutes bound how long a client keeps an old version after a
deploy. The bytes are read once per process, at the first request.
"""

import hashlib
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

PATH = "/client/userstream.js"
"""Where the client is served (PROTOCOL.md §6)."""

MEDIA_TYPE = "text/javascript; charset=utf-8"
"""The JavaScript media type (RFC 9239 §6; the WHATWG HTML spec loads module scripts only
with a JavaScript MIME type)."""

CACHE_CONTROL = "public, max-age=300"
"""Shared caches may keep it; fresh for 300 s, then revalidated by ETag."""

RESOURCE = "static/userstream.js"
"""The client inside the `gateway` package (a link to `client/userstream.js`)."""


@cache
def client_script() -> tuple[bytes, str]:
    """The client's bytes and their strong entity tag (`"<sha256 hex, 32 digits>"`, quoted as
    RFC 9110 §8.8.3 requires). Read once; raises FileNotFoundError when the installation lacks
    the file."""
    body = resources.files("gateway").joinpath(RESOURCE).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def matches(if_none_match: str, etag: str) -> bool:
    """Whether an `If-None-Match` field value names `etag`: `*`, or a comma-separated list
    one of whose members equals it by the weak comparison (RFC 9110 §13.1.2, §8.8.3.2:
    `W/"x"` matches `"x"`)."""
    if if_none_match.strip() == "*":
        return True
    return any(
        tag.strip().removeprefix("W/") == etag.removeprefix("W/")
        for tag in if_none_match.split(",")
    )


async def serve_client_script(request: Request) -> Response:
    """`200` with the module (`GET`; `HEAD` gets the headers only), or `304` without a body
    when `If-None-Match` names its current ETag."""
    body, etag = client_script()
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=MEDIA_TYPE, headers=headers)


def client_script_routes() -> list[BaseRoute]:
    """The route of the client, for every gateway app."""
    return [Route(PATH, serve_client_script)]
