"""`GET /me/presence?workspaceId=w1`: who is online in a workspace now (PROTOCOL.md §5).

The request carries the user's credentials exactly as `GET /me/stream` does (PROTOCOL.md §3:
Bearer, then the `userstream_token` cookie, then `access_token`; `gateway.auth`). Answers,
each refusal an RFC 9457 problem:
- 401 (`WWW-Authenticate: Bearer`): no valid credentials;
- 404: presence is off on this gateway (`USERSTREAM_PRESENCE=false`);
- 400: no `workspaceId`, or an empty one;
- 403: the user is not an active member of the workspace, judged against this gateway's
  access state as of now (`sync.senders` loads the requester's access when no stream of
  theirs is open here, and holds it a while, as for `POST /me/ephemeral`);
- 503 with `Retry-After`: Postgres failed while the requester's access was being loaded;
- 200 `{"workspaceId": "w1", "online": ["u1", "u2"]}`, ids sorted, `Cache-Control: no-store`:
  the users with an open stream on any replica, or within the grace after their last one
  closed, as this replica knows them (`sync.presence_feed`).
"""

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.access import ACTIVE
from gateway.auth import AuthError
from gateway.problems import problem
from gateway.runtime import Runtime
from sync.catchup import AccessLoadFailed
from sync.faults import SERVICE_FAULTS

logger = logging.getLogger(__name__)

PATH = "/me/presence"

UNAVAILABLE_RETRY_AFTER_S = 2
"""`Retry-After` of a 503, seconds."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (*SERVICE_FAULTS, AccessLoadFailed)
"""What loading the requester's access raises when Postgres fails (answered 503)."""


async def get_presence(request: Request) -> Response:
    """`GET /me/presence`: see the module docstring for the request and every answer."""
    runtime: Runtime = request.app.state.runtime
    try:
        principal = await runtime.auth.authenticate(request)
    except AuthError as exc:
        return problem(exc.status, str(exc), headers=exc.headers)
    presence = runtime.presence
    if presence is None:
        return problem(404, "presence is off on this gateway (USERSTREAM_PRESENCE=false)")
    workspace_id = request.query_params.get("workspaceId", "")
    if not workspace_id:
        return problem(400, "workspaceId is required, e.g. /me/presence?workspaceId=w1")
    user_id = principal.user_id
    try:
        state = await runtime.senders.state_for(user_id)
    except _UNAVAILABLE as exc:
        logger.warning("access of presence requester %s not loaded: %r", user_id, exc)
        detail = f"the access of user {user_id!r} could not be loaded; retry later"
        return problem(503, detail, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})
    user = state.users.get(user_id)
    if user is None or user.workspaces.get(workspace_id) != ACTIVE:
        detail = f"user {user_id!r} is not an active member of workspace {workspace_id!r}"
        return problem(403, detail, title="Forbidden")
    body = {"workspaceId": workspace_id, "online": presence.online(workspace_id)}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
