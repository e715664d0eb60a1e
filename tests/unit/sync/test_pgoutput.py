"""`sync.pgoutput.Decoder` on the messages a real PostgreSQL 16 sent (`pgoutput_capture.py`,
written by `capture_pgoutput.py`, whose steps the groups below are named after), and on
hand-built malformed bytes for each DecodeError (PostgreSQL 16 docs §55.9)."""

import struct
from collections import defaultdict
from typing import TypeVar

import pytest

from sync.pgoutput import (
    Begin,
    Column,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    Message,
    Other,
    Relation,
    Truncate,
    Update,
)
from tests.unit.sync.pgoutput_capture import MESSAGES

INT4, TEXT, JSONB, TIMESTAMPTZ = 23, 25, 3802, 1184
FIRST_NORMAL_OID = 16384  # user-defined objects (the `mood` enum) get oids from here
US_2024 = 757_382_400_000_000  # 2024-01-01 00:00 UTC, microseconds since 2000-01-01
US_2100 = 3_155_760_000_000_000
M = TypeVar("M", bound=Message)
KIND_OF_LABEL: dict[str, type | Other] = {
    "begin": Begin,
    "commit": Commit,
    "relation": Relation,
    "insert": Insert,
    "update": Update,
    "delete": Delete,
    "truncate": Truncate,
    "type": Other("Y"),
    "origin": Other("O"),
    "message": Other("M"),
}


def _decode_all() -> list[tuple[str, Message]]:
    decoder = Decoder()
    return [(label, decoder.decode(payload)) for label, payload in MESSAGES]


DECODED = _decode_all()


def _steps() -> dict[str, list[Message]]:
    steps: dict[str, list[Message]] = defaultdict(list)
    for label, message in DECODED:
        steps[label.rpartition(": ")[0]].append(message)
    return dict(steps)


STEPS = _steps()


def _only(step: str, kind: type[M]) -> list[M]:
    return [m for m in STEPS[step] if isinstance(m, kind)]


def test_each_message_decodes_to_its_kind() -> None:
    for label, message in DECODED:
        expected = KIND_OF_LABEL[label.rpartition(": ")[2]]
        if isinstance(expected, Other):
            assert message == expected, label
        else:
            assert type(message) is expected, label


def test_every_transaction_is_framed_by_begin_and_matching_commit() -> None:
    xids, final_lsns = [], []
    for step, messages in STEPS.items():
        begin, commit = messages[0], messages[-1]
        assert isinstance(begin, Begin), step
        assert isinstance(commit, Commit), step
        assert not any(isinstance(m, Begin | Commit) for m in messages[1:-1]), step
        assert begin.xid != 0
        assert commit.flags == 0
        assert commit.commit_lsn == begin.final_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert commit.commit_time_us == begin.commit_time_us
        assert US_2024 < begin.commit_time_us < US_2100
        xids.append(begin.xid)
        final_lsns.append(begin.final_lsn)
    assert len(STEPS) == 11
    assert xids == sorted(set(xids))  # one xid per transaction, in commit order here
    assert final_lsns == sorted(set(final_lsns))


def test_relation_with_every_value_kind() -> None:
    [relation] = _only("insert every value kind", Relation)
    assert (relation.schema, relation.name, relation.replica_identity) == ("public", "items", "d")
    mood = relation.columns[5]
    assert mood.name == "mood" and mood.type_oid >= FIRST_NORMAL_OID and not mood.key
    assert relation.columns == (
        Column("id", INT4, True),
        Column("title", TEXT, False),
        Column("qty", INT4, False),
        Column("doc", JSONB, False),
        Column("at", TIMESTAMPTZ, False),
        mood,
    )
    # a user-defined type is described by a Type message before the relation using it
    assert STEPS["insert every value kind"][1:3] == [Other("Y"), relation]


def test_inserts_carry_text_values_and_nulls() -> None:
    [relation] = _only("insert every value kind", Relation)
    inserts = _only("insert every value kind", Insert)
    assert inserts == [
        Insert(
            relation,
            {
                "id": "1",
                "title": "first",
                "qty": "10",
                "doc": '{"a": 1, "b": [true, null]}',
                "at": "2024-05-06 07:08:09.123456+00",
                "mood": "calm",
            },
        ),
        Insert(
            relation,
            {"id": "2", "title": None, "qty": None, "doc": None, "at": None, "mood": None},
        ),
    ]
    assert inserts[0].relation is relation  # the cached object, not a copy


FIRST_EDITED = {
    "title": "first, edited",
    "qty": "10",
    "doc": '{"a": 1, "b": [true, null]}',
    "at": "2024-05-06 07:08:09.123456+00",
    "mood": "calm",
}


def test_update_of_non_key_columns_has_no_old_image() -> None:
    [update] = _only("update non-key columns", Update)
    assert update.relation.name == "items"
    assert update.old is None
    assert update.new == {"id": "1", **FIRST_EDITED}
    assert update.unchanged == frozenset()


def test_update_of_the_key_has_the_old_key_only() -> None:
    [update] = _only("update the key", Update)
    assert update.old == {"id": "1"}  # the other columns are sent as NULL: left out
    assert update.new == {"id": "3", **FIRST_EDITED}
    assert update.unchanged == frozenset()


def test_delete_by_default_identity_has_the_key_only() -> None:
    [delete] = _only("delete by key", Delete)
    assert delete.relation.name == "items"
    assert delete.old == {"id": "3"}


def test_replica_identity_full_sends_whole_old_rows() -> None:
    step = "replica identity full"
    [relation] = _only(step, Relation)
    assert (relation.name, relation.replica_identity) == ("audit", "f")
    assert relation.columns == (Column("id", INT4, True), Column("note", TEXT, True))
    assert STEPS[step][2:-1] == [
        Insert(relation, {"id": "1", "note": "a"}),
        Insert(relation, {"id": "2", "note": None}),
        Update(relation, {"id": "1", "note": "a"}, {"id": "1", "note": "b"}, frozenset()),
        Delete(relation, {"id": "2", "note": None}),
    ]


def test_toasted_value_inserted_in_full() -> None:
    [relation] = _only("insert a toasted value", Relation)
    assert (relation.name, relation.replica_identity) == ("docs", "i")
    assert relation.columns == (
        Column("id", INT4, True),
        Column("rev", INT4, False),
        Column("body", TEXT, False),
    )
    [insert] = _only("insert a toasted value", Insert)
    assert insert.new == {"id": "1", "rev": "1", "body": "0123456789" * 300}


def test_update_beside_a_toasted_value_reports_it_unchanged() -> None:
    [update] = _only("update beside a toasted value", Update)
    assert update.relation.name == "docs"
    assert update.old is None
    assert update.new == {"id": "1", "rev": "2"}
    assert update.unchanged == frozenset({"body"})


def test_multi_statement_transaction_keeps_statement_order() -> None:
    messages = STEPS["multi-statement transaction"]
    assert [type(m).__name__ for m in messages] == [
        "Begin",
        "Insert",
        "Update",
        "Other",
        "Update",
        "Delete",
        "Commit",
    ]  # the insert into the unpublished table `private` is absent
    _, insert, docs, message, items, delete, _ = messages
    assert isinstance(insert, Insert) and isinstance(docs, Update)
    assert isinstance(items, Update) and isinstance(delete, Delete)
    assert insert.new == {
        "id": "10",
        "title": "ten",
        "qty": "100",
        "doc": None,
        "at": None,
        "mood": None,
    }
    assert (docs.new, docs.unchanged) == ({"id": "1", "rev": "3"}, frozenset({"body"}))
    assert message == Other("M")  # pg_logical_emit_message(true, 'p', 'x')
    assert (items.old, items.new["qty"]) == (None, "101")
    assert (delete.relation.name, delete.old) == ("audit", {"id": "1", "note": "b"})


def test_schema_change_resends_the_relation_and_replaces_the_cache() -> None:
    [before] = _only("insert every value kind", Relation)
    [after] = _only("schema change", Relation)
    assert after.oid == before.oid
    assert after.columns == (*before.columns, Column("extra", INT4, False))
    [insert] = _only("schema change", Insert)
    assert insert.relation is after
    assert insert.new == {
        "id": "20",
        "title": "after alter",
        "qty": None,
        "doc": None,
        "at": None,
        "mood": None,
        "extra": "7",
    }


def test_origin_message_follows_begin() -> None:
    _, origin, insert, _ = STEPS["replication origin"]
    assert origin == Other("O")
    assert isinstance(insert, Insert) and insert.new == {"id": "3", "note": "replayed"}


def test_truncate_lists_its_relations_and_options() -> None:
    [truncate] = _only("truncate", Truncate)
    assert [r.name for r in truncate.relations] == ["items", "audit"]
    assert truncate.options == 3  # CASCADE (1) | RESTART IDENTITY (2)
    # the truncate made new relation files, so pgoutput described both relations again
    assert truncate.relations == tuple(_only("truncate", Relation))


# -- malformed input ---------------------------------------------------------------------------


def _decoder_before(index: int) -> Decoder:
    decoder = Decoder()
    for _, payload in MESSAGES[:index]:
        decoder.decode(payload)
    return decoder


@pytest.mark.parametrize(("index", "label"), [(i, m[0]) for i, m in enumerate(MESSAGES)])
def test_every_truncation_or_extension_of_a_captured_message_is_refused(
    index: int, label: str
) -> None:
    payload = MESSAGES[index][1]
    decoder = _decoder_before(index)
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decoder.decode(payload[:cut])
    with pytest.raises(DecodeError, match="trailing"):
        decoder.decode(payload + b"\x00")
    assert decoder.decode(payload) == DECODED[index][1]  # failures left the cache intact


def _string(text: str) -> bytes:
    return text.encode() + b"\x00"


def _relation(oid: int = 7, identity: bytes = b"d") -> bytes:
    columns = [(1, "id", INT4), (0, "body", TEXT)]
    out = b"R" + struct.pack("!I", oid) + _string("public") + _string("t") + identity
    out += struct.pack("!H", len(columns))
    for flags, name, type_oid in columns:
        out += struct.pack("!B", flags) + _string(name) + struct.pack("!Ii", type_oid, -1)
    return out


def _text(value: bytes) -> bytes:
    return b"t" + struct.pack("!i", len(value)) + value


def _insert(oid: int = 7, *values: bytes) -> bytes:
    values = values or (_text(b"1"), _text(b"x"))
    return b"I" + struct.pack("!I", oid) + b"N" + struct.pack("!H", len(values)) + b"".join(values)


def _primed() -> Decoder:
    decoder = Decoder()
    decoder.decode(_relation())
    return decoder


def test_hand_built_messages_decode() -> None:
    decoder = Decoder()
    relation = decoder.decode(_relation())
    assert relation == Relation(
        7, "public", "t", "d", (Column("id", INT4, True), Column("body", TEXT, False))
    )
    assert decoder.decode(_insert()) == Insert(relation, {"id": "1", "body": "x"})
    assert decoder.decode(_insert(7, _text(b"2"), b"n")) == Insert(
        relation, {"id": "2", "body": None}
    )


@pytest.mark.parametrize("payload", [b"", b"\x00", b"Z", b"S\x00\x00\x00\x01\x01", b"b" * 30])
def test_unknown_message_kinds_are_refused(payload: bytes) -> None:
    # `S` (stream start) and `b` (begin prepare) exist only in protocol versions 2 and 3
    with pytest.raises(DecodeError, match=r"unknown message kind|empty"):
        Decoder().decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        _insert(),
        b"U" + struct.pack("!I", 7) + b"N" + struct.pack("!H", 2) + _text(b"1") + b"n",
        b"D" + struct.pack("!I", 7) + b"K" + struct.pack("!H", 2) + _text(b"1") + b"n",
        b"T" + struct.pack("!IBI", 1, 0, 7),
    ],
    ids=["insert", "update", "delete", "truncate"],
)
def test_changes_for_an_undescribed_relation_are_refused(payload: bytes) -> None:
    with pytest.raises(DecodeError, match="relation oid 7 never described"):
        Decoder().decode(payload)
    decoder = _primed()
    decoder.decode(payload)  # the same bytes once the relation is known
    with pytest.raises(DecodeError, match="relation oid 8 never described"):
        decoder.decode(payload.replace(struct.pack("!I", 7), struct.pack("!I", 8)))


def test_binary_values_are_refused() -> None:
    payload = _insert(7, _text(b"1"), b"b" + struct.pack("!i", 1) + b"x")
    with pytest.raises(DecodeError, match="binary value for column 'body'"):
        _primed().decode(payload)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_insert(7, _text(b"1"), b"x"), "unknown tuple value kind 'x'"),
        (_insert(7, _text(b"1")), "tuple of 1 columns"),
        (_insert(7, _text(b"1"), b"n", b"n"), "tuple of 3 columns"),
        (_insert(7, _text(b"1"), b"t" + struct.pack("!i", -1)), "truncated"),
        (_insert(7, _text(b"1"), _text(b"\xff")), "invalid UTF-8"),
        (_insert()[:5] + b"K" + _insert()[6:], "insert: expected 'N'"),
        (b"U" + struct.pack("!I", 7) + b"X", "update: expected 'K', 'O' or 'N'"),
        (b"D" + struct.pack("!I", 7) + b"N", "delete: expected 'K' or 'O'"),
        (_relation(8, identity=b"x"), "unknown replica identity 'x'"),
    ],
)
def test_malformed_messages_are_refused(payload: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        _primed().decode(payload)


def test_a_refused_relation_leaves_the_cache_as_it_was() -> None:
    decoder = _primed()
    with pytest.raises(DecodeError):
        decoder.decode(_relation(identity=b"x"))
    insert = decoder.decode(_insert())
    assert isinstance(insert, Insert) and insert.relation.replica_identity == "d"
