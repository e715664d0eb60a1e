"""A small SSE reader for tests that consume `open_stream` chunks directly (no HTTP)."""

from typing import Any

import orjson

from core.types import Frame


def parse(chunks: list[Frame]) -> list[dict[str, Any]]:
    """SSE frames as dicts of their fields (data parsed as JSON)."""
    frames = []
    for block in b"".join(chunks).split(b"\n\n"):
        fields: dict[str, Any] = {}
        for line in block.decode().split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = orjson.loads(value) if name == "data" else value
        if fields:
            frames.append(fields)
    return frames
