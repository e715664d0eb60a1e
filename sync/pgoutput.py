"""A pure decoder of the logical replication messages of PostgreSQL's `pgoutput` plugin,
protocol version 1: one `Decoder` per replication session, one `decode()` call per payload
(the `XLogData` body a walsender sends, `msg.payload` in psycopg2).

Sources, PostgreSQL 16 documentation:

- §55.9 "Logical Replication Message Formats"
  (https://www.postgresql.org/docs/16/protocol-logicalrep-message-formats.html): the layout
  of every message, decoded here field by field in the same order.
- §55.5 "Logical Streaming Replication Protocol"
  (https://www.postgresql.org/docs/16/protocol-logical-replication.html): the plugin's
  options (`proto_version`, `publication_names`, `messages`, `binary`) and which messages a
  session may see; with `proto_version` 1 no streamed (`S`, `E`, `c`, `A`) and no two-phase
  (`b`, `P`, `K`, `r`, `p`) messages are sent, so their kinds are rejected as unknown.
- §31.1 "Publication" and `REPLICA IDENTITY` in "ALTER TABLE": which old images an update
  or delete carries (`K` key columns, `O` the whole row under REPLICA IDENTITY FULL).

Wire conventions (§55.6 "Message Data Types"): integers are big-endian; an `Int32` oid and
the xid are unsigned; LSNs are unsigned 64-bit; timestamps are signed 64-bit microseconds
since 2000-01-01 00:00 UTC; strings are NUL-terminated and UTF-8 (the database encoding of
the clusters this project uses). Column values arrive in their text output form, decoded
here to `str` and never parsed further.
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

LSN = int
"""A 64-bit log sequence number (WAL position), as an unsigned integer."""


@dataclass(frozen=True, slots=True)
class Column:
    """One published column of a relation: `key` is true when it belongs to the replica
    identity (flag bit 1 on the wire; every column under REPLICA IDENTITY FULL)."""

    name: str
    type_oid: int
    key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A Relation (`R`) message: the shape of a table as of the changes that follow.

    `schema` is the namespace ("" for `pg_catalog`); `replica_identity` is `'d'` default
    (primary key), `'n'` nothing, `'f'` full, `'i'` a unique index; `columns` are the
    published columns in table order, the order of every tuple of this relation.
    """

    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """A Begin (`B`) message: `final_lsn` is the LSN of the transaction's commit record
    (equal to the `commit_lsn` of its `Commit`), `commit_time_us` microseconds since
    2000-01-01 UTC (the Postgres epoch), `xid` the transaction id."""

    final_lsn: LSN
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """A Commit (`C`) message: `flags` (currently always 0), `commit_lsn` (the commit
    record), `end_lsn` (just past it: the position to confirm once the transaction is
    durably handled), `commit_time_us` as in `Begin`."""

    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_time_us: int


Row = dict[str, str | None]
"""Column name -> text value (None for SQL NULL), in column order. A column whose value is
an unchanged TOASTed datum (`u` on the wire) is left out; an `Update` names it in
`unchanged`."""


@dataclass(frozen=True, slots=True)
class Insert:
    """An Insert (`I`) message: the new row of `relation`."""

    relation: Relation
    new: Row


@dataclass(frozen=True, slots=True)
class Update:
    """An Update (`U`) message.

    `old` is the old image when one is sent, else None: under REPLICA IDENTITY FULL (`O`)
    the whole old row; otherwise (`K`) only when a replica identity column changed, and then
    only the key columns (`Column.key`): the server sends the others as NULL, which here
    would read as values they never had, so they are left out. `new` is the new row minus
    the columns in `unchanged`, those whose TOASTed value the update did not touch (their
    value is not sent; it is whatever the subscriber already has).
    """

    relation: Relation
    old: Row | None
    new: Row
    unchanged: frozenset[str]


@dataclass(frozen=True, slots=True)
class Delete:
    """A Delete (`D`) message: `old` is the whole row under REPLICA IDENTITY FULL (`O`),
    otherwise (`K`) only the replica identity columns, as in `Update.old`."""

    relation: Relation
    old: Row


@dataclass(frozen=True, slots=True)
class Truncate:
    """A Truncate (`T`) message: the relations truncated together, and `options`, a bit set:
    1 CASCADE, 2 RESTART IDENTITY."""

    relations: tuple[Relation, ...]
    options: int


@dataclass(frozen=True, slots=True)
class Other:
    """A well-formed message that needs no action: `'O'` origin, `'Y'` type, `'M'` logical
    message (`pg_logical_emit_message`, with the `messages` option)."""

    kind: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Other


class DecodeError(ValueError):
    """Bytes that are not a protocol-1 pgoutput message this decoder accepts: truncated or
    with trailing bytes, an unknown message kind or tuple value kind, invalid UTF-8, a change
    for a relation oid no Relation message described, a tuple whose column count differs
    from its relation's, or a binary (`b`) value (the `binary` option is never requested)."""


_U8: Final = struct.Struct("!B")
_U16: Final = struct.Struct("!H")
_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")
_U64: Final = struct.Struct("!Q")
_BEGIN: Final = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT: Final = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp

_BEGIN_KIND: Final = ord("B")
_BEGIN_SIZE: Final = 1 + _BEGIN.size
_COMMIT_KIND: Final = ord("C")
_COMMIT_SIZE: Final = 1 + _COMMIT.size

_REPLICA_IDENTITIES: Final = frozenset("dnfi")
_KEY_FLAG: Final = 1  # LOGICALREP_IS_REPLICA_IDENTITY


class _Reader:
    """A cursor over one payload; every read checks the bounds and raises DecodeError."""

    def __init__(self, payload: bytes) -> None:
        self._data = bytes(payload)
        self._view = memoryview(self._data)
        self.pos = 0

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        end = self.pos + layout.size
        if end > len(self._data):
            raise DecodeError(f"truncated: {layout.size} bytes wanted at offset {self.pos}")
        values = layout.unpack_from(self._data, self.pos)
        self.pos = end
        return values

    def read(self, layout: struct.Struct) -> int:
        value: int = self.unpack(layout)[0]
        return value

    def char(self) -> str:
        return chr(self.read(_U8))

    def string(self) -> str:
        end = self._data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError(f"truncated: unterminated string at offset {self.pos}")
        text = self._text(self.pos, end)
        self.pos = end + 1
        return text

    def sized_text(self) -> str:
        size = self.read(_I32)
        end = self.pos + size
        if size < 0 or end > len(self._data):
            raise DecodeError(f"truncated: value of {size} bytes at offset {self.pos}")
        text = self._text(self.pos, end)
        self.pos = end
        return text

    def skip_sized(self) -> None:
        size = self.read(_I32)
        if size < 0 or self.pos + size > len(self._data):
            raise DecodeError(f"truncated: content of {size} bytes at offset {self.pos}")
        self.pos += size

    def finish(self) -> None:
        if self.pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self.pos} trailing bytes at offset {self.pos}")

    def _text(self, start: int, end: int) -> str:
        try:
            return str(self._view[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 at offset {start + exc.start}") from None


class Decoder:
    """Decodes the messages of one replication session, in order.

    Keeps the relation cache: pgoutput sends a Relation message before the first change of a
    relation in each session, and again after its schema changes; the latest one for an oid
    replaces the earlier. A new session (a new `START_REPLICATION`) needs a new Decoder.
    """

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}
        self._handlers: dict[str, Callable[[_Reader], Message]] = {
            "B": self._begin,
            "C": self._commit,
            "R": self._relation,
            "I": self._insert,
            "U": self._update,
            "D": self._delete,
            "T": self._truncate,
            "O": self._origin,
            "Y": self._type,
            "M": self._message,
        }

    def decode(self, payload: bytes) -> Message:
        """Decode one message (the whole payload, first byte its kind, §55.9).

        Returns the message; a Relation is cached first, Insert/Update/Delete/Truncate carry
        the cached Relation of their oid. Raises DecodeError (see there); the cache is left
        as it was when a Relation message fails to decode.
        """
        if not payload:
            raise DecodeError("empty message")
        # Begin and Commit frame every transaction: decoded without the general reader when
        # their size is exact (any other size takes the checked path, which raises).
        kind_byte, size = payload[0], len(payload)
        if kind_byte == _BEGIN_KIND and size == _BEGIN_SIZE:
            return Begin(*_BEGIN.unpack_from(payload, 1))
        if kind_byte == _COMMIT_KIND and size == _COMMIT_SIZE:
            return Commit(*_COMMIT.unpack_from(payload, 1))
        reader = _Reader(payload)
        kind = reader.char()
        handler = self._handlers.get(kind)
        if handler is None:
            raise DecodeError(f"unknown message kind {kind!r}")
        message = handler(reader)
        reader.finish()
        if isinstance(message, Relation):
            self._relations[message.oid] = message
        return message

    def _begin(self, r: _Reader) -> Begin:
        final_lsn, commit_time_us, xid = r.unpack(_BEGIN)
        return Begin(final_lsn, commit_time_us, xid)

    def _commit(self, r: _Reader) -> Commit:
        flags, commit_lsn, end_lsn, commit_time_us = r.unpack(_COMMIT)
        return Commit(flags, commit_lsn, end_lsn, commit_time_us)

    def _relation(self, r: _Reader) -> Relation:
        oid = r.read(_U32)
        schema = r.string()
        name = r.string()
        replica_identity = r.char()
        if replica_identity not in _REPLICA_IDENTITIES:
            raise DecodeError(f"unknown replica identity {replica_identity!r} of {name!r}")
        columns = []
        for _ in range(r.read(_U16)):
            flags = r.read(_U8)
            column_name = r.string()
            type_oid = r.read(_U32)
            r.read(_I32)  # type modifier: not needed for text values
            columns.append(Column(column_name, type_oid, bool(flags & _KEY_FLAG)))
        return Relation(oid, schema, name, replica_identity, tuple(columns))

    def _insert(self, r: _Reader) -> Insert:
        relation = self._relation_of(r.read(_U32))
        _expect(r, "N", "insert")
        new, _ = _tuple(r, relation)
        return Insert(relation, new)

    def _update(self, r: _Reader) -> Update:
        relation = self._relation_of(r.read(_U32))
        old: Row | None = None
        marker = r.char()
        if marker in ("K", "O"):
            old = _old_tuple(r, relation, marker)
            marker = r.char()
        if marker != "N":
            raise DecodeError(f"update: expected 'K', 'O' or 'N', got {marker!r}")
        new, unchanged = _tuple(r, relation)
        return Update(relation, old, new, unchanged)

    def _delete(self, r: _Reader) -> Delete:
        relation = self._relation_of(r.read(_U32))
        marker = r.char()
        if marker not in ("K", "O"):
            raise DecodeError(f"delete: expected 'K' or 'O', got {marker!r}")
        return Delete(relation, _old_tuple(r, relation, marker))

    def _truncate(self, r: _Reader) -> Truncate:
        count = r.read(_U32)
        options = r.read(_U8)
        relations = tuple(self._relation_of(r.read(_U32)) for _ in range(count))
        return Truncate(relations, options)

    def _origin(self, r: _Reader) -> Other:
        r.read(_U64)  # commit LSN on the origin server
        r.string()  # origin name
        return Other("O")

    def _type(self, r: _Reader) -> Other:
        r.read(_U32)  # type oid
        r.string()  # namespace
        r.string()  # type name
        return Other("Y")

    def _message(self, r: _Reader) -> Other:
        r.read(_U8)  # flags: 1 transactional
        r.read(_U64)  # LSN of the message
        r.string()  # prefix
        r.skip_sized()  # content
        return Other("M")

    def _relation_of(self, oid: int) -> Relation:
        relation = self._relations.get(oid)
        if relation is None:
            raise DecodeError(f"change for relation oid {oid} never described")
        return relation


def _expect(r: _Reader, marker: str, what: str) -> None:
    got = r.char()
    if got != marker:
        raise DecodeError(f"{what}: expected {marker!r}, got {got!r}")


def _old_tuple(r: _Reader, relation: Relation, marker: str) -> Row:
    """The old image after `marker`: the whole row for `O`, the key columns for `K`."""
    row, _ = _tuple(r, relation)
    if marker == "K":
        return {c.name: row[c.name] for c in relation.columns if c.key and c.name in row}
    return row


def _tuple(r: _Reader, relation: Relation) -> tuple[Row, frozenset[str]]:
    """TupleData: Int16 column count, then per column `n` null, `u` unchanged TOASTed datum,
    `t` Int32 length + text bytes (`b` binary is refused). Returns the row without the `u`
    columns, and their names."""
    count = r.read(_U16)
    if count != len(relation.columns):
        raise DecodeError(
            f"tuple of {count} columns for {relation.schema}.{relation.name}"
            f" of {len(relation.columns)}"
        )
    row: Row = {}
    unchanged: list[str] = []
    for column in relation.columns:
        kind = r.char()
        if kind == "t":
            row[column.name] = r.sized_text()
        elif kind == "n":
            row[column.name] = None
        elif kind == "u":
            unchanged.append(column.name)
        elif kind == "b":
            raise DecodeError(f"binary value for column {column.name!r} (never requested)")
        else:
            raise DecodeError(f"unknown tuple value kind {kind!r} for column {column.name!r}")
    return row, frozenset(unchanged)
