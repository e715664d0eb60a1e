"""The per-user cap on open streams in one gateway process (answered with 429)."""


class ConnectionLimiter:
    """Counts open streams per user; `acquire` refuses past `limit` (> 0, else ValueError)."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be > 0, got {limit}")
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, user_id: str) -> bool:
        """Count one more stream of `user_id`; False (nothing counted) when at the limit."""
        count = self._open.get(user_id, 0)
        if count >= self.limit:
            return False
        self._open[user_id] = count + 1
        return True

    def release(self, user_id: str) -> None:
        """One stream of `user_id` ended."""
        count = self._open.get(user_id, 0) - 1
        if count > 0:
            self._open[user_id] = count
        else:
            self._open.pop(user_id, None)

    def open_streams(self, user_id: str) -> int:
        """Streams of `user_id` currently counted."""
        return self._open.get(user_id, 0)
