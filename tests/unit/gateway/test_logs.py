"""Log lines never carry tokens; JSON format is one object per line."""

import io
import logging

import orjson

from gateway.logs import ConsoleFormatter, JsonFormatter, RedactingFilter, redact


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_redact_hides_query_tokens_and_bearer_tokens() -> None:
    line = 'GET /me/stream?offset=now&access_token=eyJ.abc.def HTTP/1.1 "Bearer eyJ.x.y"'
    assert redact(line) == (
        'GET /me/stream?offset=now&access_token=[redacted] HTTP/1.1 "Bearer [redacted]"'
    )


def test_access_log_arguments_are_redacted_before_formatting() -> None:
    logger, stream = capture(ConsoleFormatter())
    logger.info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:1",
        "GET",
        "/me/stream?access_token=s3cr3t",
        "1.1",
        200,
    )
    assert "s3cr3t" not in stream.getvalue()
    assert "access_token=[redacted]" in stream.getvalue()


def test_json_format_is_one_object_per_line_with_extras() -> None:
    logger, stream = capture(JsonFormatter())
    logger.info("connected %s", "access_token=abc", extra={"connection_id": "c1"})
    logger.warning("second")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert first["msg"] == "connected access_token=[redacted]"
    assert first["connection_id"] == "c1"
    assert first["level"] == "info" and first["ts"].endswith("Z")
    assert orjson.loads(lines[1])["level"] == "warning"
