"""`OutboxEvent.validate`: values Postgres would refuse are refused before anything is written
(PROTOCOL.md §1; `core.publish`). Writing them would abort the caller's transaction.

Postgres text and jsonb cannot store U+0000 (PostgreSQL docs §8.3, §8.14), so the SDK refuses
a NUL character in every string field and anywhere in the JSON text of `data` and `tx`.
"""

import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.publish import InvalidEvent, OutboxEvent
from tests.factories import stream_message

STRING_FIELDS = (
    "type",
    "resource_type",
    "action",
    "entity_id",
    "workspace_id",
    "stream_id",
    "user_id",
    "actor_id",
)


@pytest.mark.parametrize("name", STRING_FIELDS)
def test_a_nul_character_in_a_string_field_is_refused(name: str) -> None:
    event = stream_message(user_id="u1")
    value = getattr(event, name)
    bad = dataclasses.replace(event, **{name: f"{value}\x00"})

    with pytest.raises(InvalidEvent, match=rf"^{name} contains a NUL character \(U\+0000\)"):
        bad.validate()


@pytest.mark.parametrize("name", ["data", "tx"])
@pytest.mark.parametrize(
    "value",
    [
        {"text": "a\x00b"},
        {"\x00": "a key"},
        {"nested": [{"deep": ["\x00"]}]},
        {"text": "\\\x00"},  # a backslash, then NUL: JSON `\\\u0000`
    ],
    ids=["value", "key", "nested", "after-backslash"],
)
def test_a_nul_character_in_data_or_tx_is_refused(name: str, value: dict[str, Any]) -> None:
    event = dataclasses.replace(stream_message(), **{name: value})

    with pytest.raises(InvalidEvent, match=rf"^{name} contains a NUL character"):
        event.validate()


def test_data_that_is_a_bare_nul_string_is_refused() -> None:
    with pytest.raises(InvalidEvent, match=r"^data contains a NUL character"):
        stream_message(data="\x00").validate()


@pytest.mark.parametrize(
    "text",
    ["\\u0000", "\\\\u0000", "u0000", "\\x00", "\x01\x1f"],
    ids=["escape-as-text", "escaped-backslash", "no-backslash", "x-escape-as-text", "controls"],
)
def test_text_that_only_looks_like_a_nul_is_accepted(text: str) -> None:
    params = stream_message(data={"text": text}, tx={"id": text}).validate()

    assert orjson.loads(params[-2]) == {"text": text}
    assert orjson.loads(params[-1]) == {"id": text}


@given(st.text(max_size=20), st.text(max_size=5))
def test_data_is_refused_exactly_when_a_string_or_key_holds_a_nul(text: str, key: str) -> None:
    event = stream_message(data={key: [text, {"k": text}]})
    if "\x00" in text or "\x00" in key:
        with pytest.raises(InvalidEvent, match=r"^data contains a NUL character"):
            event.validate()
    else:
        assert orjson.loads(event.validate()[-2]) == {key: [text, {"k": text}]}


@pytest.mark.parametrize(
    ("tx", "kind"),
    [("tab-1", "str"), (["t1"], "list"), (7, "int"), (True, "bool")],
)
def test_a_tx_that_is_not_a_mapping_is_refused(tx: Any, kind: str) -> None:
    event = dataclasses.replace(stream_message(), tx=tx)

    with pytest.raises(InvalidEvent, match=rf"^tx must be a mapping .* or None, got {kind}$"):
        event.validate()


@pytest.mark.parametrize("tx", [None, {}, {"id": "t1", "sourceId": "tab-1"}])
def test_a_tx_that_is_a_mapping_or_none_is_accepted(tx: dict[str, str] | None) -> None:
    params = dataclasses.replace(stream_message(), tx=tx).validate()

    assert params[-1] == (None if tx is None else orjson.dumps(tx).decode())


def test_the_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="NUL"):
        OutboxEvent("t\x00", "stream_event", "create", "e1", workspace_id="w1").validate()
