"""PresenceBook: pairs vouched for per replica, grace, remote announcements, per-workspace diffs;
PresenceUpdate: numbered updates between replicas, and their encoding."""

from collections.abc import Iterable

import orjson
import pytest

from sync.presence import Announcement, PresenceBook, PresenceUpdate, WorkspaceDiff

MEMBERSHIPS = {"alice": ["w1", "w2"], "bob": ["w1"], "carol": ["w2"]}


def workspaces(user: str) -> Iterable[str]:
    return MEMBERSHIPS.get(user, [])


def test_a_connection_makes_its_user_online_in_each_active_workspace_at_once() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("alice")
    change = book.tick(0.0, workspaces)
    assert change == Announcement(frozenset({("w1", "alice"), ("w2", "alice")}), frozenset())
    assert book.online("w1") == {"alice"}
    assert book.diff("w1") == WorkspaceDiff("w1", ("alice",), ())
    assert not book.diff("w1")  # nothing new since


def test_a_reconnect_within_the_grace_announces_nothing() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("bob")
    book.tick(0.0, workspaces)
    book.diff("w1")
    book.disconnected("bob")
    assert not book.tick(1.0, workspaces)
    book.connected("bob")
    assert not book.tick(9.0, workspaces)
    assert not book.tick(20.0, workspaces)
    assert book.online("w1") == {"bob"}
    assert not book.diff("w1")


def test_a_real_disconnect_goes_offline_after_the_grace() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("bob")
    book.tick(0.0, workspaces)
    book.diff("w1")
    book.disconnected("bob")
    assert not book.tick(5.0, workspaces)
    assert book.online("w1") == {"bob"}
    change = book.tick(15.0, workspaces)
    assert change == Announcement(frozenset(), frozenset({("w1", "bob")}))
    assert book.online("w1") == frozenset()
    assert book.diff("w1") == WorkspaceDiff("w1", (), ("bob",))


def test_two_streams_of_one_user_count_as_one_until_both_close() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.connected("carol")
    book.connected("carol")
    book.tick(0.0, workspaces)
    book.disconnected("carol")
    assert not book.tick(1.0, workspaces)
    book.disconnected("carol")
    assert book.tick(2.0, workspaces).offline == {("w2", "carol")}
    book.disconnected("carol")  # one too many: ignored
    assert book.connected_users() == 0


def test_losing_the_membership_takes_the_user_offline_there_only() -> None:
    memberships = {"alice": ["w1", "w2"]}
    book = PresenceBook("r1", grace_s=0)
    book.connected("alice")
    book.tick(0.0, lambda u: memberships[u])
    memberships["alice"] = ["w2"]
    change = book.tick(1.0, lambda u: memberships[u])
    assert change == Announcement(frozenset(), frozenset({("w1", "alice")}))
    assert book.online("w2") == {"alice"}


def test_remote_announcements_and_a_user_on_two_replicas() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.apply_remote("r2", Announcement(frozenset({("w1", "bob"), ("w1", "dan")}), frozenset()))
    assert book.online("w1") == {"bob", "dan"}
    book.connected("bob")
    book.tick(0.0, workspaces)
    book.apply_remote("r2", Announcement(frozenset(), frozenset({("w1", "bob")})))
    assert book.online("w1") == {"bob", "dan"}  # still vouched for by r1
    book.apply_remote("r2", Announcement(frozenset(), frozenset({("w1", "bob")})))  # repeated
    assert book.online("w1") == {"bob", "dan"}
    book.apply_remote("r1", Announcement(frozenset(), frozenset({("w1", "bob")})))  # own: ignored
    assert "bob" in book.online("w1")


def test_a_replica_whose_heartbeat_expired_takes_its_users_offline() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.replace_remote({"r2": [("w1", "dan")], "r3": [("w1", "erin"), ("w2", "erin")]})
    assert book.online("w1") == {"dan", "erin"}
    book.diff("w1")
    book.replace_remote({"r2": [("w1", "dan")], "r1": [("w1", "ignored")]})
    assert book.online("w1") == {"dan"}
    assert book.online("w2") == frozenset()
    assert book.diff("w1") == WorkspaceDiff("w1", (), ("erin",))


def test_changes_that_cancel_out_within_an_interval_send_nothing() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.apply_remote("r2", Announcement(frozenset({("w1", "dan")}), frozenset()))
    book.diff("w1")
    book.apply_remote("r2", Announcement(frozenset(), frozenset({("w1", "dan")})))
    book.apply_remote("r2", Announcement(frozenset({("w1", "dan")}), frozenset()))
    assert not book.diff("w1")
    book.forget("w1")
    assert book.diff("w1") == WorkspaceDiff("w1", ("dan",), ())


def update(replica: str, seq: int, *online: tuple[str, str], **options: object) -> PresenceUpdate:
    offline = options.get("offline", ())
    assert isinstance(offline, tuple)
    return PresenceUpdate(
        replica, seq, frozenset(online), frozenset(offline), full=bool(options.get("full"))
    )


def test_updates_round_trip_through_their_encoding_grouped_by_workspace() -> None:
    change = update(
        "r1", 7, ("w1", "bob"), ("w1", "alice"), ("w2", "alice"), offline=(("w3", "x"),)
    )
    payload = change.encode()

    assert orjson.loads(payload) == {
        "replica": "r1",
        "seq": 7,
        "full": False,
        "online": {"w1": ["alice", "bob"], "w2": ["alice"]},
        "offline": {"w3": ["x"]},
    }
    assert PresenceUpdate.decode(payload) == change
    full = update("r2", 0, full=True)
    assert PresenceUpdate.decode(full.encode()) == full


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "line 1 column 1"),
        (b"[]", "list"),
        (b'{"seq": 1, "full": false, "online": {}, "offline": {}}', "replica"),
        (b'{"replica": "r", "seq": true, "full": false, "online": {}, "offline": {}}', "seq"),
        (b'{"replica": "r", "seq": 1, "full": 0, "online": {}, "offline": {}}', "full"),
        (b'{"replica": "r", "seq": 1, "full": false, "online": [], "offline": {}}', "pairs"),
        (b'{"replica": "r", "seq": 1, "full": false, "online": {"w": [1]}, "offline": {}}', "'w'"),
    ],
)
def test_decoding_refuses_what_is_not_an_update(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PresenceUpdate.decode(payload)


def test_a_connect_is_announced_at_once_for_the_new_user_only() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("alice")
    book.tick(0.0, workspaces)
    book.connected("bob")

    assert book.announce_new(workspaces) == Announcement(frozenset({("w1", "bob")}), frozenset())
    assert not book.announce_new(workspaces)  # nothing new since
    assert book.online("w1") == {"alice", "bob"}
    assert not book.tick(1.0, workspaces)  # already announced


def test_a_reconnect_within_the_grace_announces_nothing_at_once_either() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("bob")
    book.tick(0.0, workspaces)
    book.disconnected("bob")
    book.tick(5.0, workspaces)  # leaving since 5
    book.connected("bob")

    assert not book.announce_new(workspaces)
    assert not book.tick(16.0, workspaces)  # no longer leaving: stays online
    assert book.online("w1") == {"bob"}


def test_a_user_gone_before_the_announcement_is_not_announced() -> None:
    book = PresenceBook("r1", grace_s=10)
    book.connected("bob")
    book.disconnected("bob")
    assert not book.announce_new(workspaces)


def test_outgoing_updates_are_numbered_and_the_full_update_carries_the_last_number() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.connected("bob")
    first = book.outgoing(book.tick(0.0, workspaces))
    book.disconnected("bob")
    second = book.outgoing(book.tick(1.0, workspaces))

    assert first == update("r1", 1, ("w1", "bob"))
    assert second == update("r1", 2, offline=(("w1", "bob"),))
    assert book.full_update() == update("r1", 2, full=True)


def test_receive_ignores_own_updates_and_changes_not_newer_than_the_last_applied() -> None:
    book = PresenceBook("r1", grace_s=0)
    assert not book.receive(update("r1", 1, ("w1", "me")), 0.0)
    assert book.receive(update("r2", 5, ("w1", "dan")), 0.0)
    assert not book.receive(update("r2", 5, ("w1", "erin")), 0.0)  # the same number again
    assert not book.receive(update("r2", 4, offline=(("w1", "dan"),)), 0.0)  # overtaken
    assert book.online("w1") == {"dan"}

    assert book.receive(update("r2", 7, ("w1", "erin")), 0.0)  # a gap: applied all the same
    assert book.online("w1") == {"dan", "erin"}


def test_a_full_update_replaces_the_replicas_set_unless_it_is_older() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.receive(update("r2", 3, ("w1", "dan"), ("w2", "dan")), 0.0)

    assert not book.receive(update("r2", 2, ("w1", "old"), full=True), 0.0)
    assert book.receive(update("r2", 3, ("w1", "dan"), full=True), 0.0)  # same number: same set
    assert book.online("w1") == {"dan"}
    assert book.online("w2") == frozenset()
    assert book.receive(update("r2", 9, ("w1", "erin"), full=True), 0.0)
    assert book.online("w1") == {"erin"}


def test_heartbeats_older_than_an_applied_announcement_are_ignored() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.receive(update("r2", 6, ("w1", "dan")), 10.0)

    book.apply_heartbeats([update("r2", 5, full=True)], read_since=11.0)  # written before 6
    assert book.online("w1") == {"dan"}
    book.apply_heartbeats([update("r2", 6, ("w1", "dan"), ("w1", "erin"), full=True)], 12.0)
    assert book.online("w1") == {"dan", "erin"}


def test_heartbeats_repair_lost_announcements_and_drop_replicas_without_one() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.receive(update("r2", 1, ("w1", "dan")), 0.0)
    book.receive(update("r3", 1, ("w1", "erin")), 0.0)

    heartbeats = [
        update("r2", 4, ("w1", "fay"), full=True),
        update("r1", 9, ("w1", "x"), full=True),
    ]
    book.apply_heartbeats(heartbeats, read_since=1.0)  # r3's heartbeat expired

    assert book.online("w1") == {"fay"}
    assert not book.receive(update("r2", 3, ("w1", "late")), 2.0)
    assert book.receive(update("r3", 1, ("w1", "erin")), 2.0)  # r3 forgotten: any number again


def test_a_replica_heard_during_the_heartbeat_read_is_kept() -> None:
    """A replica that announced before its first heartbeat was visible to the read."""
    book = PresenceBook("r1", grace_s=0)
    book.receive(update("r2", 1, ("w1", "dan")), 5.0)

    book.apply_heartbeats([], read_since=4.0)
    assert book.online("w1") == {"dan"}
    book.apply_heartbeats([], read_since=6.0)
    assert book.online("w1") == frozenset()


def test_changed_names_each_workspace_whose_set_moved_once() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.receive(update("r2", 1, ("w1", "dan"), ("w2", "dan")), 0.0)
    book.receive(update("r3", 1, ("w1", "dan")), 0.0)  # already online in w1: no change

    assert book.changed() == {"w1", "w2"}
    assert book.changed() == set()
    book.receive(update("r3", 2, offline=(("w1", "dan"),)), 0.0)  # r2 still vouches
    assert book.changed() == set()
    book.receive(update("r2", 2, offline=(("w1", "dan"),)), 0.0)
    assert book.changed() == {"w1"}
    assert book.pair_count() == 1


def test_the_counts_of_users_and_pairs() -> None:
    book = PresenceBook("r1", grace_s=0)
    book.connected("alice")
    book.connected("alice")
    book.tick(0.0, workspaces)
    book.receive(update("r2", 1, ("w1", "alice"), ("w1", "dan")), 0.0)

    assert book.connected_users() == 1
    assert book.pair_count() == 3  # (w1, alice), (w2, alice), (w1, dan)
