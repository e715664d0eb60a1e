"""`If-None-Match` matching of gateway/client_script.py (RFC 9110 §13.1.2: weak comparison)."""

import pytest

from gateway.client_script import matches

ETAG = '"0123456789abcdef0123456789abcdef"'


@pytest.mark.parametrize(
    ("if_none_match", "expected"),
    [
        (ETAG, True),
        ("*", True),
        (" * ", True),
        (f"W/{ETAG}", True),  # weak comparison: the W/ prefix is ignored
        (f'"a", {ETAG}', True),
        (f'"a",{ETAG} ,"b"', True),
        ('"a", "b"', False),
        ("", False),
        (ETAG.strip('"'), False),  # unquoted is not the same tag
        (ETAG[:-2] + '"', False),
        ('"*"', False),
    ],
)
def test_if_none_match_names_the_tag(if_none_match: str, expected: bool) -> None:
    assert matches(if_none_match, ETAG) is expected
