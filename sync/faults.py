"""The failures a userstream process expects from its backing services, and survives.

Postgres or Redis unreachable, restarted or timing out: logged without a traceback and
retried with backoff (relay, dispatcher) or answered with a `close` frame so the client
reconnects (catch-up). Anything else is a bug and gets a traceback.
"""

import asyncpg
import redis.exceptions

SERVICE_FAULTS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError (asyncio.timeout, socket timeouts)
    asyncpg.PostgresError,  # server-side errors, e.g. admin shutdown, cannot connect now
    asyncpg.InterfaceError,  # e.g. ConnectionDoesNotExistError: the connection was closed
    asyncpg.InternalClientError,  # a connection lost mid-protocol ("unexpected ... state")
    redis.exceptions.ConnectionError,  # Redis unreachable or restarted
    redis.exceptions.TimeoutError,
)
"""Exception types meaning "a backing service failed", not "the code is wrong"."""
