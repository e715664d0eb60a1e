"""Shared types of the domain, so that `core` needs no I/O framework import.

`Connection` is the slice of an asyncpg connection that `core` and `sync` use; any object with
these coroutine methods (an `asyncpg.Connection`, a pool's acquired connection) fits.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Frame = bytes
"""One or more complete SSE frames, each ending in a blank line (WHATWG HTML §9.2.6)."""

ChannelKey = str
"""A routing channel: `user:{id}` or `workspace:{id}` (see `core.channels`)."""

Row = Mapping[str, Any]
"""A database row by column name (an `asyncpg.Record` or a plain dict)."""


class Connection(Protocol):
    """The asyncpg connection methods `core` relies on (asyncpg.Connection satisfies it)."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...

    async def executemany(
        self, command: str, args: Sequence[Sequence[Any]], *, timeout: float | None = None
    ) -> None: ...

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...
